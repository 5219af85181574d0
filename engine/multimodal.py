"""Multimodal items as they travel through the engine.

The front end's per-architecture processor turns images/videos into ``MultiModalFeature``s: the
tensors the vision tower needs, where the item's placeholder tokens sit in the prompt, and a
content hash. The hash is the encoder-cache key and joins the prefix-cache key of every block the
item's tokens touch, so the same text with a different image never shares KV blocks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class MultiModalFeature:
    modality: str  # "image" | "video"
    identifier: str  # content hash (hex)
    offset: int  # index of the item's first placeholder token in the prompt
    length: int  # number of placeholder tokens (= rows of the encoder output)
    # Inputs of the vision tower (e.g. pixel_values + image_grid_thw) or precomputed embeddings.
    data: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.offset + self.length


def hash_item(obj: Any) -> str:
    """Content hash of an image (PIL), array, tensor, or a list/dict of them."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor{tuple(t.shape)}{t.dtype}".encode())
        # hashed from the buffers themselves (no bytes copy: images are hundreds of KB)
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"ndarray{obj.shape}{obj.dtype}".encode())
        h.update(np.ascontiguousarray(obj).data)
    elif isinstance(obj, dict):
        for key in sorted(obj):
            h.update(str(key).encode())
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"seq{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    elif hasattr(obj, "tobytes") and hasattr(obj, "mode") and hasattr(obj, "size"):  # PIL image
        h.update(f"pil{obj.mode}{obj.size}".encode())
        h.update(obj.tobytes())
    else:
        h.update(repr(obj).encode())


def block_extra_keys(features: list[MultiModalFeature], block_size: int) -> dict[int, tuple[str, ...]]:
    """For each block index, the identifiers of the items whose placeholder tokens fall in it."""
    keys: dict[int, list[str]] = {}
    for f in features:
        for block in range(f.offset // block_size, (f.end - 1) // block_size + 1):
            keys.setdefault(block, []).append(f.identifier)
    return {b: tuple(ids) for b, ids in keys.items()}
