"""Phi-3-vision image preprocessing: the HD resize (host) and the crops (device).

What the published ``Phi3VImageProcessor`` does to one image, split in two:

* host (``hd_image_u8``): RGB; a portrait image is transposed to landscape; resized (PIL bilinear)
  to ``scale * 336`` wide, keeping the aspect ratio, where ``scale`` is the largest number of
  crops across with ``scale * ceil(scale / ratio) <= num_crops``; padded with white above and below
  to a multiple of 336 high; transposed back. The result is uint8 ``[H, W, 3]``, H and W multiples
  of 336 (``hd_size`` gives H and W without touching pixels).
* device (``Phi3VDevicePreprocessor``): scale to [0, 1], normalise with the CLIP mean / std, then
  the global view (the whole HD image resized bicubically to 336x336) followed by the
  ``(H/336) x (W/336)`` crops in row-major order: ``pixel_values [1 + hc*wc, 3, 336, 336]``.

``num_image_tokens(H, W)`` is the processor's formula ``(hc*wc + 1)*144 + 1 + (hc + 1)*12``
(``hc = H/336``, ``wc = W/336``; 144 = ``num_img_tokens`` per crop, 12 its square root).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.device import to_device_async
from engine.mm_device_preprocessor import DevicePreprocessor

CROP = 336
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _resized_landscape(width: int, height: int, num_crops: int, crop: int) -> tuple[int, int]:
    """(width, height) of a landscape (width >= height) image after the HD resize, before padding."""
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * crop)
    return new_w, int(new_w / ratio)


def hd_size(width: int, height: int, num_crops: int, crop: int = CROP) -> tuple[int, int]:
    """(H, W) of the padded HD image of a ``width x height`` input."""
    transposed = width < height
    w, h = (height, width) if transposed else (width, height)
    new_w, new_h = _resized_landscape(w, h, num_crops, crop)
    if new_w < 1 or new_h < 1:
        raise ValueError(f"image of {width}x{height} pixels is too narrow for the HD transform")
    padded_h = math.ceil(new_h / crop) * crop
    return (new_w, padded_h) if transposed else (padded_h, new_w)


def num_image_tokens(height: int, width: int, tokens_per_crop: int = 144, crop: int = CROP) -> int:
    """Placeholder tokens of a padded HD image of ``height x width`` (multiples of ``crop``)."""
    hc, wc = height // crop, width // crop
    side = math.isqrt(tokens_per_crop)
    return (hc * wc + 1) * tokens_per_crop + 1 + (hc + 1) * side


def hd_image_u8(image: Any, num_crops: int, crop: int = CROP) -> np.ndarray:
    """A PIL image -> the padded HD image, uint8 [H, W, 3]."""
    from PIL import Image

    img = image.convert("RGB")
    transposed = img.width < img.height
    if transposed:  # resized as landscape, like the published processor (PIL resizes rows first)
        img = img.transpose(Image.Transpose.TRANSPOSE)
    new_w, new_h = _resized_landscape(img.width, img.height, num_crops, crop)
    if new_w < 1 or new_h < 1:
        raise ValueError(f"image of {image.width}x{image.height} pixels is too narrow for the HD transform")
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    padded_h = math.ceil(new_h / crop) * crop
    top = (padded_h - new_h) // 2
    canvas = Image.new("RGB", (new_w, padded_h), (255, 255, 255))
    canvas.paste(img, (0, top))
    if transposed:
        canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
    return np.array(canvas, dtype=np.uint8)  # a writable copy (torch.from_numpy wants one)


def crops_from_u8(image_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, crop: int = CROP) -> torch.Tensor:
    """uint8 [H, W, 3] (on any device) -> pixel_values [1 + hc*wc, 3, crop, crop] fp32: the global
    view first, then the crops row-major."""
    h, w, _ = image_u8.shape
    x = image_u8.permute(2, 0, 1).float().div(255)  # [3, H, W] in [0, 1]
    x = x.sub(mean[:, None, None]).div(std[:, None, None])
    glob = F.interpolate(x[None], size=(crop, crop), mode="bicubic", align_corners=False)  # [1, 3, crop, crop]
    hc, wc = h // crop, w // crop
    crops = x.reshape(3, hc, crop, wc, crop).permute(1, 3, 0, 2, 4).reshape(hc * wc, 3, crop, crop)
    return torch.cat([glob, crops])


class Phi3VDevicePreprocessor(DevicePreprocessor):
    """``{"image_u8": [H, W, 3]}`` -> ``{"pixel_values": [1 + hc*wc, 3, 336, 336], "crops_hw": (hc, wc)}``
    on the device (``crops_hw`` stays on the host: the model reads it there); precomputed
    ``image_embeds`` are moved as they are."""

    host_keys = frozenset({"crops_hw"})

    def __init__(self, config: Any, device: torch.device) -> None:
        super().__init__(config, device)
        from engine.mm_processors.phi3v import image_normalization

        mean, std = image_normalization(config.model.model_dir)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)

    def prepare(self, modality: str, items: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        out = []
        for d in items:
            if "image_u8" not in d:
                out.extend(super().prepare(modality, [d]))
                continue
            u8 = d["image_u8"]
            pixels = crops_from_u8(to_device_async(u8, self.device), self.mean, self.std)
            out.append({"pixel_values": pixels, "crops_hw": torch.tensor([u8.shape[0] // CROP, u8.shape[1] // CROP])})
        return out
