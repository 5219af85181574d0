"""LLaVA-1.5 inputs: each ``<image>`` token expands to the image's feature count,
(image_size / patch_size)^2 (+1 with ``vision_feature_select_strategy="full"``); pixels come from
the model folder's image processor (``CLIPImageProcessor``, its PIL version where torchvision is
absent: resize the shortest edge, center-crop to the tower's size, normalize). Precomputed
embeddings — a ``(feature_size, lm_hidden)`` tensor per image, or ``{"image_embeds": tensor}`` —
skip the tower. Positions are plain 1-D (no M-RoPE)."""

from __future__ import annotations

from typing import Any

import torch

from engine.mm_processor import MultiModalProcessor, ProcessedPrompt, _is_pil, expand_placeholders
from engine.multimodal import MultiModalFeature, hash_item


class LlavaProcessor(MultiModalProcessor):
    image_placeholder_text = "<image>"
    image_placeholder_token = "<image>"

    def __init__(self, config: Any, tokenizer: Any) -> None:
        super().__init__(config, tokenizer)
        from engine.models.llava import get_image_token_id, num_image_features

        hf = config.model.hf_config
        self.hf_config = hf
        self.image_token_id = get_image_token_id(hf)
        self.num_features = num_image_features(hf)
        self.image_size = int(hf.vision_config.image_size)
        self.lm_hidden = int(hf.text_config.hidden_size)
        self._image_processor = None

    def load(self) -> None:
        self.image_processor  # noqa: B018 (loads it)

    @property
    def image_processor(self) -> Any:
        if self._image_processor is None:
            from transformers import AutoImageProcessor

            self._image_processor = AutoImageProcessor.from_pretrained(self.config.model.model_dir)
        return self._image_processor

    def _embeds_feature(self, index: int, embeds: Any) -> tuple[dict[str, torch.Tensor], str]:
        embeds = torch.as_tensor(embeds)
        if embeds.dim() == 3 and embeds.shape[0] == 1:
            embeds = embeds[0]
        if embeds.dim() != 2 or tuple(embeds.shape) != (self.num_features, self.lm_hidden):
            raise ValueError(
                f"multi_modal_data: image {index}: precomputed embeddings must have shape "
                f"({self.num_features}, {self.lm_hidden}) (feature_size, hidden), got {tuple(embeds.shape)}"
            )
        if not embeds.is_floating_point():
            raise ValueError(f"multi_modal_data: image {index}: precomputed embeddings must be floating point")
        return {"image_embeds": embeds}, hash_item(embeds)

    def _image_feature(self, index: int, item: Any) -> tuple[dict[str, torch.Tensor], str]:
        """(vision-tower inputs or precomputed embeddings, content hash) of one image item."""
        if isinstance(item, torch.Tensor):
            return self._embeds_feature(index, item)
        if isinstance(item, dict):
            if "image_embeds" not in item:
                raise ValueError(f"multi_modal_data: image {index}: a dict item needs 'image_embeds'")
            return self._embeds_feature(index, item["image_embeds"])
        if not _is_pil(item):
            raise ValueError(
                f"multi_modal_data: image {index}: expected a PIL image or a precomputed embedding tensor "
                f"of shape ({self.num_features}, {self.lm_hidden}), got {type(item).__name__}"
            )
        try:
            rgb = item.convert("RGB")  # decodes lazily opened files: truncated or corrupt data fails here
            pixels = self.image_processor(images=[rgb], return_tensors="pt")["pixel_values"]
        except Exception as exc:
            raise ValueError(f"multi_modal_data: image {index} could not be processed: {exc}") from exc
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"multi_modal_data: image {index}: the image processor produced {tuple(pixels.shape[-2:])} pixels "
                f"but the vision tower takes {self.image_size}x{self.image_size} (check preprocessor_config.json)"
            )
        return {"pixel_values": pixels}, hash_item(rgb)

    def process(self, token_ids: list[int], items: dict[str, list[Any]]) -> ProcessedPrompt:
        if "video" in items:
            raise ValueError("multi_modal_data: video input is not supported for this model")
        images = items.get("image", [])
        features_in = [self._image_feature(i, item) for i, item in enumerate(images)]
        counts = [self.num_features] * len(features_in)
        ids, offsets = expand_placeholders(token_ids, self.image_token_id, counts, "image")
        features = [
            MultiModalFeature("image", h, off, c, d) for (d, h), off, c in zip(features_in, offsets, counts)
        ]
        return ProcessedPrompt(ids, features)
