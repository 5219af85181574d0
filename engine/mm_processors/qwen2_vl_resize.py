"""Qwen2-VL / Qwen2.5-VL images in the front end: PIL image -> resized RGB uint8 array + its hash.

Two paths, as HF has two processors (``engine.mm_processors.qwen2_vl_fast`` says which one runs):
the PIL one below, and the fast (torchvision-backend) one, whose resize is torch's uint8
interpolate (``QwenResizeSpec.fast``; ``qwen2_vl_fast.resize_hwc_u8``). RGB conversion is the same.

This is the part of HF's ``Qwen2VLImageProcessorPil`` that has to run on the host:
decoding, RGB conversion and the PIL resize. Rescale, normalize and the patch layout run where the
vision tower runs, batched over the images of one vision pass
(``engine.mm_processors.qwen2_vl_pixels``), so the front end ships ``uint8 [h, w, 3]`` — 8x fewer
bytes than ``pixel_values`` (float32, every patch repeated ``temporal_patch_size`` times).

Bit-exact with HF's PIL path (transformers 5.x ``PilBackend`` / ``image_transforms``):

* ``do_convert_rgb``: an image with transparency (an ``A`` band, or ``info["transparency"]``) is
  composited onto white, anything else is ``convert("RGB")``-ed (``image_transforms.convert_to_rgb``).
* ``do_resize``: the target (h, w) is transformers' own ``smart_resize(h, w, patch * merge,
  min_pixels, max_pixels)``; HF then always calls ``PIL.Image.resize((w, h), resample,
  reducing_gap=None)`` on the RGB uint8 pixels, which returns an unchanged copy when the size is
  already right — so resizing only when the size changes gives the same pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.mm_processors.qwen2_vl_fast import resize_hwc_u8, torch_resize_mode

_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR: HF's PIL backend's fallback when resample is unset


@functools.cache
def _smart_resize() -> Callable[..., tuple[int, int]]:
    """transformers' ``smart_resize``: the PIL backend's copy in 5.x (``image_processing_qwen2_vl``
    imports torchvision there), else the 4.x one in ``image_processing_qwen2_vl``."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    return smart_resize


def _size_entry(size: Any, key: str) -> int | None:
    """``size[key]`` of a processor's ``size`` (a dict in transformers 4.x, a ``SizeDict`` in 5.x)."""
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def _pil_resample(value: Any) -> int:
    """A PIL resampling filter from a processor's ``resample`` (as ``PilBackend.resize`` reads it)."""
    if value is None:
        return _BILINEAR
    try:
        return int(value)  # PILImageResampling (an IntEnum) or a plain int from the JSON
    except (TypeError, ValueError):
        pass
    try:  # a torchvision InterpolationMode: HF maps it back to PIL's filter, else BILINEAR
        from transformers.image_utils import torch_pil_interpolation_mapping
    except ImportError:
        return _BILINEAR
    return int(torch_pil_interpolation_mapping.get(value, _BILINEAR))


@dataclass(frozen=True)
class QwenResizeSpec:
    """The HF image processor settings the front end needs (patch geometry and resize rule)."""

    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    resample: int
    do_resize: bool = True
    do_convert_rgb: bool = True
    fast: bool = False  # HF's fast (torchvision-backend) resize instead of PIL's

    @classmethod
    def from_image_processor(cls, ip: Any, fast: bool = False) -> QwenResizeSpec:
        """From an HF Qwen2-VL image processor object. ``min_pixels`` / ``max_pixels`` are
        ``size.shortest_edge`` / ``size.longest_edge`` (transformers >= 4.49; 5.x has no other),
        else the older ``min_pixels`` / ``max_pixels`` attributes or ``size`` keys."""
        size = getattr(ip, "size", None)
        lo = _size_entry(size, "shortest_edge") or getattr(ip, "min_pixels", None) or _size_entry(size, "min_pixels")
        hi = _size_entry(size, "longest_edge") or getattr(ip, "max_pixels", None) or _size_entry(size, "max_pixels")
        if not lo or not hi or not 0 < int(lo) <= int(hi):
            raise ValueError(
                f"image processor: size must give 0 < shortest_edge (min_pixels) <= longest_edge (max_pixels), got {size!r}"
            )
        return cls(
            patch_size=int(ip.patch_size),
            merge_size=int(ip.merge_size),
            min_pixels=int(lo),
            max_pixels=int(hi),
            resample=_pil_resample(getattr(ip, "resample", None)),
            do_resize=bool(getattr(ip, "do_resize", True)),
            do_convert_rgb=bool(getattr(ip, "do_convert_rgb", True)),
            fast=fast,
        )

    def __post_init__(self) -> None:
        if self.fast:
            torch_resize_mode(self.resample)  # a filter without a torch mode fails at load, not per image

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the image is resized to: both multiples of patch * merge."""
        if not self.do_resize:
            if height % self.factor or width % self.factor:
                raise ValueError(
                    f"with do_resize off the image size must be a multiple of {self.factor}, got {width}x{height}"
                )
            return height, width
        return _smart_resize()(height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)


def to_rgb(image: Any, composite_alpha: bool = True) -> Any:
    """A PIL image in mode RGB. With ``composite_alpha`` (HF's ``do_convert_rgb``), transparency is
    composited onto white as ``transformers.image_transforms.convert_to_rgb`` does; without it the
    alpha is dropped. An RGB image without transparency is returned as is (no copy)."""
    from PIL import Image

    if composite_alpha and ("A" in image.getbands() or image.info.get("transparency") is not None):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def image_to_u8(image: Any, spec: QwenResizeSpec) -> np.ndarray:
    """PIL image -> the resized RGB pixels HF's processor (PIL or fast, per ``spec.fast``) would
    normalize: uint8 [h, w, 3], with h and w multiples of patch * merge. Raises what PIL raises on
    corrupt or truncated data."""
    rgb = to_rgb(image, spec.do_convert_rgb)
    width, height = rgb.size
    th, tw = spec.target_size(height, width)
    if spec.fast:
        # HF's fast processor resizes np.array of the RGB image (convert_to_rgb(return_numpy=True)).
        pixels = np.array(rgb)  # [h, w, 3] uint8
        if (th, tw) != (height, width):
            pixels = resize_hwc_u8(torch.from_numpy(pixels), th, tw, torch_resize_mode(spec.resample)).numpy()
    else:
        if (th, tw) != (height, width):
            rgb = rgb.resize((tw, th), resample=spec.resample)  # reducing_gap=None, as HF
        # np.array, not asarray: asarray wraps PIL's read-only bytes, which torch warns about (and
        # must never write to); the extra copy is ~20 us for 448x448.
        pixels = np.array(rgb)  # [h, w, 3] uint8
    if pixels.dtype != np.uint8 or pixels.shape != (th, tw, 3):
        raise ValueError(f"expected RGB uint8 pixels of shape {(th, tw, 3)}, got {pixels.shape} {pixels.dtype}")
    return pixels
