"""Phi-3-vision inputs: ``<|image_N|>`` tags, HD-transformed images, placeholder counts.

Prompt format (the published ``Phi3VProcessor``): the text names image N (1-based) with the tag
``<|image_N|>``; the processor splits the text at the tags, tokenises every piece on its own with
the tokenizer's defaults (so a tokenizer that adds BOS adds it to every piece), and puts the
image's placeholder run where its tag was. Here (``tokenize``) a tag becomes one ``<|image|>``
token, which ``process`` expands to the image's count (``phi3v_pixels.num_image_tokens`` of its
HD size). Tags must be ``<|image_1|>`` .. ``<|image_n|>``, in order, once each.

Prompts given as token ids carry one ``<|image|>`` id per image (or the fully expanded runs).
Images: a PIL image (HD-resized here, cropped on the device: ``phi3v_pixels``), or precomputed
embeddings — a ``(num_tokens, hidden)`` tensor or ``{"image_embeds": tensor}``.

``num_crops`` (the most 336x336 crops per image) and the normalisation come from the folder's
preprocessor_config.json (Phi3VImageProcessor's fields; num_crops defaults to 1 as in that class).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from engine.mm_processor import MultiModalProcessor, ProcessedPrompt, _is_pil, expand_placeholders
from engine.mm_processors.phi3v_pixels import CLIP_MEAN, CLIP_STD, hd_image_u8, hd_size, num_image_tokens
from engine.multimodal import MultiModalFeature, hash_item

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
IMAGE_TOKEN = "<|image|>"
# vLLM's placeholder id for tokenizers without an <|image|> token (32044 in Phi-3-vision's vocab).
FALLBACK_IMAGE_TOKEN_ID = 32044


def _preprocessor_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "preprocessor_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def image_normalization(model_dir: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel from preprocessor_config.json, CLIP's by default."""
    pp = _preprocessor_config(model_dir)
    return tuple(pp.get("image_mean") or CLIP_MEAN), tuple(pp.get("image_std") or CLIP_STD)


class Phi3VProcessor(MultiModalProcessor):
    image_placeholder_text = "<|image_1|>"
    image_placeholder_token = "<|image_"  # counts the tags in a rendered chat prompt

    def __init__(self, config: Any, tokenizer: Any) -> None:
        super().__init__(config, tokenizer)
        hf = config.model.hf_config
        self.lm_hidden = int(hf.hidden_size)
        self.tokens_per_crop = int(dict(hf.img_processor).get("num_img_tokens", 144))
        self.num_crops = int(_preprocessor_config(config.model.model_dir).get("num_crops", 1))
        if self.num_crops < 1:
            raise ValueError(f"phi3v: preprocessor_config.json num_crops must be >= 1, got {self.num_crops}")
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if not isinstance(token_id, int) or token_id == getattr(tokenizer, "unk_token_id", None):
            token_id = FALLBACK_IMAGE_TOKEN_ID
        if not 0 <= token_id < int(hf.vocab_size):
            raise ValueError(f"phi3v: the image placeholder id {token_id} is outside the vocabulary")
        self.image_token_id = token_id

    def image_placeholder(self, number: int) -> str:
        return f"<|image_{number}|>"

    def image_token_count(self, width: int, height: int) -> int:
        """Placeholder tokens of a ``width x height`` image (the processor's
        ``calc_num_image_tokens_from_image_size``)."""
        return num_image_tokens(*hd_size(width, height, self.num_crops), self.tokens_per_crop)

    # -- text -----------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text with ``<|image_N|>`` tags -> ids, one ``<|image|>`` id per tag; the pieces between
        tags are tokenised separately with the tokenizer's defaults, as the published processor
        does (whatever ``add_special_tokens`` says: it only applies to text without tags)."""
        tags = [int(m.group(1)) for m in IMAGE_TAG.finditer(text)]
        if not tags:
            return super().tokenize(text, add_special_tokens)
        if tags != list(range(1, len(tags) + 1)):
            raise ValueError(
                f"prompt: image tags must be <|image_1|> .. <|image_{len(tags)}|> in order, once each; got "
                + ", ".join(f"<|image_{t}|>" for t in tags)
            )
        ids: list[int] = []
        for i, piece in enumerate(IMAGE_TAG.split(text)[::2]):  # split() interleaves the tag numbers
            if i:
                ids.append(self.image_token_id)
            ids.extend(self.tokenizer(piece).input_ids)
        return ids

    # -- images ---------------------------------------------------------------------------------

    def _embeds_feature(self, index: int, embeds: Any) -> tuple[dict[str, torch.Tensor], str, int]:
        embeds = torch.as_tensor(embeds)
        if embeds.dim() == 3 and embeds.shape[0] == 1:
            embeds = embeds[0]
        if embeds.dim() != 2 or embeds.shape[1] != self.lm_hidden or embeds.shape[0] < 1:
            raise ValueError(f"multi_modal_data: image {index}: precomputed embeddings must have shape "
                             f"(num_tokens, {self.lm_hidden}), got {tuple(embeds.shape)}")
        if not embeds.is_floating_point():
            raise ValueError(f"multi_modal_data: image {index}: precomputed embeddings must be floating point")
        return {"image_embeds": embeds}, hash_item(embeds), int(embeds.shape[0])

    def _image_feature(self, index: int, item: Any) -> tuple[dict[str, torch.Tensor], str, int]:
        """(feature data, content hash, placeholder count) of one image item."""
        if isinstance(item, torch.Tensor):
            return self._embeds_feature(index, item)
        if isinstance(item, dict):
            if "image_embeds" not in item:
                raise ValueError(f"multi_modal_data: image {index}: a dict item needs 'image_embeds'")
            return self._embeds_feature(index, item["image_embeds"])
        if not _is_pil(item):
            raise ValueError(f"multi_modal_data: image {index}: expected a PIL image or a precomputed embedding "
                             f"tensor of shape (num_tokens, {self.lm_hidden}), got {type(item).__name__}")
        try:
            rgb = item.convert("RGB")  # decodes lazily opened files: truncated or corrupt data fails here
            u8 = hd_image_u8(rgb, self.num_crops)
        except Exception as exc:
            raise ValueError(f"multi_modal_data: image {index} could not be processed: {exc}") from exc
        count = num_image_tokens(u8.shape[0], u8.shape[1], self.tokens_per_crop)
        # The crop count is part of what the features depend on: keyed with the pixels.
        return {"image_u8": torch.from_numpy(u8)}, hash_item([rgb, self.num_crops]), count

    def process(self, token_ids: list[int], items: dict[str, list[Any]]) -> ProcessedPrompt:
        if "video" in items:
            raise ValueError("multi_modal_data: video input is not supported for this model")
        feats = [self._image_feature(i, item) for i, item in enumerate(items.get("image", []))]
        counts = [c for _, _, c in feats]
        ids, offsets = expand_placeholders(token_ids, self.image_token_id, counts, "image")
        features = [MultiModalFeature("image", h, off, c, d) for (d, h, c), off in zip(feats, offsets)]
        return ProcessedPrompt(ids, features)
