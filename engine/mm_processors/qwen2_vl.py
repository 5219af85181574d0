"""Qwen2-VL / Qwen2.5-VL inputs: ``<|image_pad|>`` expands to t*h*w / merge^2 tokens per image
(from ``image_grid_thw``), pixels come from the model folder's image processor (its PIL version
where torchvision is absent), and M-RoPE positions are computed for the expanded prompt."""

from __future__ import annotations

from typing import Any

import torch

from engine.mm_processor import MultiModalProcessor, ProcessedPrompt, _is_pil, expand_placeholders
from engine.multimodal import MultiModalFeature, hash_item


class Qwen2VLProcessor(MultiModalProcessor):
    image_placeholder_text = "<|vision_start|><|image_pad|><|vision_end|>"
    image_placeholder_token = "<|image_pad|>"

    def __init__(self, config: Any, tokenizer: Any) -> None:
        super().__init__(config, tokenizer)
        hf = config.model.hf_config
        self.hf_config = hf
        self.image_token_id = hf.image_token_id
        self.video_token_id = hf.video_token_id
        self.merge = hf.vision_config.spatial_merge_size
        self._image_processor = None

    @property
    def image_processor(self) -> Any:
        if self._image_processor is None:  # loaded on first use: text-only traffic never pays for it
            from transformers import AutoImageProcessor

            self._image_processor = AutoImageProcessor.from_pretrained(self.config.model.model_dir)
        return self._image_processor

    def _image_feature(self, index: int, item: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor, str]:
        """(vision-tower inputs, grid [3], content hash) of one image item."""
        if isinstance(item, dict):  # {"image_embeds": [n, hidden], "image_grid_thw": [1, 3] or [3]}
            if "image_embeds" not in item or "image_grid_thw" not in item:
                raise ValueError(f"multi_modal_data: image {index}: a dict item needs 'image_embeds' and 'image_grid_thw'")
            grid = torch.as_tensor(item["image_grid_thw"]).reshape(-1)[:3].long()
            embeds = torch.as_tensor(item["image_embeds"])
            return {"image_embeds": embeds}, grid, hash_item(item)
        if not _is_pil(item):
            raise ValueError(
                f"multi_modal_data: image {index}: expected a PIL image or an image_embeds dict, got {type(item).__name__}"
            )
        try:
            out = self.image_processor(images=[item.convert("RGB")], return_tensors="pt")
        except Exception as exc:  # corrupt or truncated image data surfaces here
            raise ValueError(f"multi_modal_data: image {index} could not be processed: {exc}") from exc
        grid = out["image_grid_thw"][0].long()
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}, grid, hash_item(item)

    def process(self, token_ids: list[int], items: dict[str, list[Any]]) -> ProcessedPrompt:
        if "video" in items:
            raise ValueError("multi_modal_data: video input is not supported yet for this model")
        from engine.models.qwen2_vl import get_mrope_positions

        images = items.get("image", [])
        data, grids, hashes = [], [], []
        for i, item in enumerate(images):
            d, g, h = self._image_feature(i, item)
            data.append(d)
            grids.append(g)
            hashes.append(h)
        counts = [int(g.prod()) // (self.merge**2) for g in grids]
        for i, (d, c) in enumerate(zip(data, counts)):
            if "image_embeds" in d and d["image_embeds"].shape[0] != c:
                raise ValueError(
                    f"multi_modal_data: image {i}: image_embeds has {d['image_embeds'].shape[0]} rows "
                    f"but image_grid_thw implies {c}"
                )
        ids, offsets = expand_placeholders(token_ids, self.image_token_id, counts, "image")
        features = [
            MultiModalFeature("image", h, off, c, d) for h, off, c, d in zip(hashes, offsets, counts, data)
        ]
        grid_thw = torch.stack(grids) if grids else None
        positions, delta = get_mrope_positions(ids, grid_thw, None, self.hf_config)
        return ProcessedPrompt(ids, features, positions, delta)
