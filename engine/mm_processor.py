"""Multimodal input processing in the front end: images in, placeholder-expanded token ids and
``MultiModalFeature``s out.

Each architecture has a processor (registered lazily, like models) that knows its placeholder
token, how many LM tokens an item becomes, and how to preprocess pixels with the model folder's
HF image processor. This base class checks the ``multi_modal_data`` forms and per-prompt limits.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.multimodal import MultiModalFeature

_PROCESSORS: dict[str, tuple[str, str]] = {
    "Qwen2VLForConditionalGeneration": ("engine.mm_processors.qwen2_vl", "Qwen2VLProcessor"),
    "Qwen2_5_VLForConditionalGeneration": ("engine.mm_processors.qwen2_vl", "Qwen2VLProcessor"),
    "LlavaForConditionalGeneration": ("engine.mm_processors.llava", "LlavaProcessor"),
    "Phi3VForCausalLM": ("engine.mm_processors.phi3v", "Phi3VProcessor"),
    "MiniCPMV": ("engine.mm_processors.minicpmv", "MiniCPMVProcessor"),
}

MODALITIES = ("image", "video")


@dataclass
class ProcessedPrompt:
    prompt_token_ids: list[int]
    mm_features: list[MultiModalFeature] = field(default_factory=list)
    mrope_positions: torch.Tensor | None = None  # [3, num_tokens] int64
    mrope_delta: int = 0


def get_mm_processor(config: Any, tokenizer: Any) -> "MultiModalProcessor | None":
    """The processor for the model's architecture, or None for text-only models."""
    entry = _PROCESSORS.get(config.model.architecture)
    if entry is None:
        return None
    return getattr(importlib.import_module(entry[0]), entry[1])(config, tokenizer)


def _is_pil(obj: Any) -> bool:
    return hasattr(obj, "mode") and hasattr(obj, "size") and hasattr(obj, "convert")


def _is_frame(obj: Any) -> bool:
    """A video frame: a PIL image or an (H, W, C) array."""
    return _is_pil(obj) or (isinstance(obj, np.ndarray) and obj.ndim == 3)


class MultiModalProcessor(ABC):
    # What a chat message carries in place of an image when its template renders no placeholder,
    # and the token text that marks one image in a rendered prompt.
    image_placeholder_text: str = ""
    image_placeholder_token: str = ""
    # The same for one video; empty for models that take no video.
    video_placeholder_text: str = ""
    video_placeholder_token: str = ""

    def __init__(self, config: Any, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.limits: dict[str, int] = dict(config.model.limit_mm_per_prompt)

    def load(self) -> None:
        """Load now what the first image request would otherwise load: the model folder's image
        processor config and the transformers modules it imports (torch._dynamo among them:
        seconds on a busy CPU). Called once at start-up, before the server reports ready."""

    def normalize(self, mm_data: Any) -> dict[str, list[Any]]:
        """{"image": item | [items], "video": ...} -> modality -> list, checking forms and limits."""
        if not isinstance(mm_data, dict):
            raise ValueError("multi_modal_data: must be a dict such as {'image': ...}")
        items: dict[str, list[Any]] = {}
        for modality, value in mm_data.items():
            if modality not in MODALITIES:
                raise ValueError(f"multi_modal_data: unknown modality {modality!r}; use 'image' or 'video'")
            if modality == "image" and isinstance(value, torch.Tensor) and value.dim() == 3:
                value = list(value)  # (num_images, feature_size, hidden): precomputed embeddings
            elif modality == "video" and isinstance(value, list) and value and _is_frame(value[0]):
                value = [value]  # one video given as its list of frames
            elif not isinstance(value, list):
                value = [value]
            value = self.split_items(modality, value)
            limit = self.limits.get(modality, 999)
            if len(value) > limit:
                raise ValueError(
                    f"multi_modal_data: {len(value)} {modality} items exceed limit_mm_per_prompt[{modality!r}]={limit}"
                )
            items[modality] = value
        return items

    def image_placeholder(self, number: int) -> str:
        """The text standing for the ``number``-th (1-based) image of a chat prompt whose template
        writes none; numbered for models such as Phi-3-vision (``<|image_N|>``)."""
        return self.image_placeholder_text

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text prompt; models whose HF processor tokenises around its image tags
        (Phi-3-vision) override this."""
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def split_items(self, modality: str, items: list[Any]) -> list[Any]:
        """Items that stand for several (e.g. one embeddings dict covering n images) -> one per item."""
        return items

    @abstractmethod
    def process(self, token_ids: list[int], items: dict[str, list[Any]]) -> ProcessedPrompt:
        """Preprocess the items and expand their placeholders in ``token_ids``."""


def expand_placeholders(
    token_ids: list[int], placeholder: int, counts: list[int], what: str
) -> tuple[list[int], list[int]]:
    """Replace the i-th single ``placeholder`` with ``counts[i]`` copies; returns (ids, item offsets).

    Prompts already expanded (as many placeholders as the items need in total) are accepted as is.
    """
    positions = [i for i, t in enumerate(token_ids) if t == placeholder]
    if len(positions) == sum(counts) and len(positions) != len(counts):
        offsets, i = [], 0
        for c in counts:  # already expanded: items are consecutive runs of placeholders
            offsets.append(positions[i])
            i += c
        return list(token_ids), offsets
    if len(positions) != len(counts):
        raise ValueError(
            f"multi_modal_data: the prompt has {len(positions)} {what} placeholder(s) but {len(counts)} {what} item(s) were given"
        )
    out: list[int] = []
    offsets = []
    prev = 0
    for pos, count in zip(positions, counts):
        out.extend(token_ids[prev:pos])
        offsets.append(len(out))
        out.extend([placeholder] * count)
        prev = pos + 1
    out.extend(token_ids[prev:])
    return out, offsets
