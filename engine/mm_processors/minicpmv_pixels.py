"""MiniCPM-V 2.6 slices on the device: rescale, normalise, cut into patches.

The host (``minicpmv_slicing.slice_images_u8``) sends each overview / slice as uint8
``[h, w, 3]`` (sides multiples of the patch size p); here it becomes what the published
processor's ``reshape_by_patch`` and the model's conv patch embedding amount to: the slice's
``(h/p) x (w/p)`` patches in row-major order, each flattened channel-major ``(c, ky, kx)``, i.e.
``patches [(h/p)*(w/p), 3*p*p]`` in float32 after ``(x / 255 - mean) / std``, and
``tgt_size = (h/p, w/p)`` (kept on the host: the model reads it there).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from engine.device import to_device_async
from engine.mm_device_preprocessor import DevicePreprocessor

DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


def preprocessor_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "preprocessor_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def patches_from_u8(slice_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, patch: int) -> torch.Tensor:
    """uint8 [h, w, 3] (on any device) -> normalised patches [(h/p)*(w/p), 3*p*p] fp32."""
    h, w, _ = slice_u8.shape
    if h % patch or w % patch:
        raise ValueError(f"minicpmv: a {w}x{h} slice is not a whole number of {patch}x{patch} patches")
    x = slice_u8.permute(2, 0, 1).float().div(255)  # [3, h, w]
    x = x.sub(mean[:, None, None]).div(std[:, None, None])
    x = x.reshape(3, h // patch, patch, w // patch, patch).permute(1, 3, 0, 2, 4)  # [h/p, w/p, 3, p, p]
    return x.reshape((h // patch) * (w // patch), 3 * patch * patch)


class MiniCPMVDevicePreprocessor(DevicePreprocessor):
    """``{"slice_u8": [h, w, 3]}`` -> ``{"patches": [L, 3*p*p], "tgt_size": (h/p, w/p)}``;
    precomputed ``image_embeds`` are moved as they are."""

    host_keys = frozenset({"tgt_size"})

    def __init__(self, config: Any, device: torch.device) -> None:
        super().__init__(config, device)
        pp = preprocessor_config(config.model.model_dir)
        self.patch = int(pp.get("patch_size", getattr(config.model.hf_config, "patch_size", 14)))
        self.mean = torch.tensor(pp.get("norm_mean") or DEFAULT_MEAN, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(pp.get("norm_std") or DEFAULT_STD, dtype=torch.float32, device=self.device)

    def prepare(self, modality: str, items: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        out = []
        for d in items:
            if "slice_u8" not in d:
                out.extend(super().prepare(modality, [d]))
                continue
            u8 = d["slice_u8"]
            patches = patches_from_u8(to_device_async(u8, self.device), self.mean, self.std, self.patch)
            out.append({"patches": patches,
                        "tgt_size": torch.tensor([u8.shape[0] // self.patch, u8.shape[1] // self.patch])})
        return out
