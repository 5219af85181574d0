"""Qwen2-VL / Qwen2.5-VL ``pixel_values`` built where the vision tower runs.

The front end (``engine.mm_processors.qwen2_vl_resize``) ships each image as its resized RGB
pixels, ``image_u8`` uint8 [h, w, 3] + ``image_grid_thw`` [[1, h/p, w/p]]. Here, on the model's
device and batched over the images of one vision pass, they become exactly what HF's
``Qwen2VLImageProcessor`` (PIL backend, ``_preprocess`` + ``patchify``) emits:

* rescale: ``float32(float64(x) * rescale_factor)`` (HF upcasts to float64, then casts down);
* normalize: ``(x - mean) / std`` in float32;
* or, where HF runs its fast (torchvision-backend) processor (``QwenPixelSpec.fast``, chosen by
  ``engine.mm_processors.qwen2_vl_fast.resolve_use_fast``), both fused as it fuses them:
  ``(float32(x) - mean / rescale_factor) / (std / rescale_factor)`` in float32, the two
  constants computed as HF computes them (``qwen2_vl_fast.fused_mean_std``);
* layout: ``pixel_values`` [gh*gw, C*T*p*p], rows ordered merge block by merge block
  (h-block, w-block, h-in-block, w-in-block), each row a (C, T, p, p) patch whose T =
  ``temporal_patch_size`` time steps are copies of the one image.

Same arithmetic in the same precisions as numpy: bit-identical to HF's on CPU
(tests/test_qwen2_vl_pixels.py); on CUDA the ops are the same correctly rounded IEEE ones (not
checked on a GPU here). A device without float64 would be off by float32 rounding (< 1e-6).

``Qwen2VLDevicePreprocessor`` is the model runner's per-architecture hook (registered in
``engine.mm_device_preprocessor``); items given as embeddings, videos and ready ``pixel_values``
pass through unchanged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.device import to_device_async
from engine.mm_device_preprocessor import DevicePreprocessor
from engine.mm_processors.qwen2_vl_fast import fused_mean_std, resolve_use_fast

logger = logging.getLogger(__name__)

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _per_channel(value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    """HF's mean / std: one number for all channels, or one per channel."""
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"image processor: image_mean / image_std need 3 values (RGB), got {value!r}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class QwenPixelSpec:
    """How uint8 pixels become ``pixel_values``: the HF image processor's patch geometry and
    rescale / normalize settings."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, float, float] = _CLIP_MEAN
    std: tuple[float, float, float] = _CLIP_STD
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    fast: bool = False  # HF's fast processor's fused rescale / normalize instead of the PIL one's

    @classmethod
    def from_image_processor(cls, ip: Any, fast: bool = False) -> QwenPixelSpec:
        """From an HF Qwen2-VL image processor object (either backend, transformers 4.x or 5.x);
        ``fast``: the arithmetic of HF's fast processor (its settings are the same)."""
        return cls(
            patch_size=int(ip.patch_size),
            temporal_patch_size=int(ip.temporal_patch_size),
            merge_size=int(ip.merge_size),
            mean=_per_channel(getattr(ip, "image_mean", None), _CLIP_MEAN),
            std=_per_channel(getattr(ip, "image_std", None), _CLIP_STD),
            rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)),
            do_rescale=bool(getattr(ip, "do_rescale", True)),
            do_normalize=bool(getattr(ip, "do_normalize", True)),
            fast=fast,
        )

    @property
    def patch_dim(self) -> int:
        """Width of a ``pixel_values`` row: C * T * p * p (1176 for Qwen2-VL)."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    def check_against(self, vision_config: Any) -> None:
        """The vision tower's patch geometry must be the one the pixels are cut into."""
        for ours, theirs in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                             ("merge_size", "spatial_merge_size")):
            want = getattr(vision_config, theirs, None)
            if want is not None and int(want) != getattr(self, ours):
                raise ValueError(
                    f"image processor: {ours}={getattr(self, ours)} does not match the model's vision_config.{theirs}={want}"
                )


@functools.lru_cache(maxsize=16)
def _mean_std(spec: QwenPixelSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) float32 [3, 1, 1] on ``device``, made once (not a host-to-device copy per pass);
    for the fast path with rescale on, HF's fused constants (mean, std over rescale_factor),
    computed on the host as HF computes them there."""
    if spec.fast and spec.do_rescale:
        mean, std = fused_mean_std(spec.mean, spec.std, spec.rescale_factor)
        return mean.to(device), std.to(device)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(3, 1, 1)
    return mean, std


def _pack_same_size(x: torch.Tensor, spec: QwenPixelSpec) -> torch.Tensor:
    """x: uint8 [n, H, W, 3] (H, W multiples of patch * merge) -> float32 [n, gh*gw, C*T*p*p]."""
    n, height, width, channels = x.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = height // p, width // p
    # Patch layout first, on the uint8 pixels (4x fewer bytes to move than float32):
    # [n, hb, m, p, wb, m, p, C] -> [n, hb, wb, mh, mw, C, ph, pw]
    v = x.view(n, gh // m, m, p, gw // m, m, p, channels).permute(0, 1, 4, 2, 5, 7, 3, 6).contiguous()
    if spec.fast:
        # HF's fast processor: with normalize on, rescale is folded into mean / std (_mean_std);
        # rescale alone is uint8 * rescale_factor, a float32 product.
        r = v * spec.rescale_factor if spec.do_rescale and not spec.do_normalize else v.float()
    elif spec.do_rescale:  # float64 product, then float32: HF's PIL rescale, bit for bit
        r = v.double().mul_(spec.rescale_factor).float()
    else:
        r = v.float()
    if spec.do_normalize:  # float32, channel broadcast over the [ph, pw] tail
        mean, std = _mean_std(spec, x.device)
        r.sub_(mean).div_(std)
    # Every patch repeated over T time steps: [n, hb, wb, mh, mw, C, T, ph, pw]
    out = torch.empty(*r.shape[:6], t, p, p, dtype=torch.float32, device=x.device)
    out.copy_(r.unsqueeze(6).expand(*r.shape[:6], t, p, p))
    return out.view(n, gh * gw, spec.patch_dim)


def pack_images(
    images: Sequence[torch.Tensor], spec: QwenPixelSpec, *, max_images_per_op: int | None = None
) -> list[torch.Tensor]:
    """uint8 [h_i, w_i, 3] images (on the device) -> one float32 ``pixel_values`` [gh_i*gw_i,
    C*T*p*p] per image, in order; ``torch.cat`` of them is HF's batch ``pixel_values``.

    Images of the same size are stacked and packed by one set of ops (a handful of kernels per
    size instead of per image); ``max_images_per_op`` caps a stack (on CPU there is no launch
    cost to amortise, and a stack of large outputs only falls out of cache).
    """
    factor = spec.patch_size * spec.merge_size
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[2] != 3 or img.dtype != torch.uint8:
            raise ValueError(f"image_u8: image {i} must be uint8 [h, w, 3], got {tuple(img.shape)} {img.dtype}")
        h, w = int(img.shape[0]), int(img.shape[1])
        if h == 0 or w == 0 or h % factor or w % factor:
            raise ValueError(f"image_u8: image {i} is {w}x{h}; both sides must be positive multiples of {factor}")
        groups.setdefault((h, w), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(images)
    step = max_images_per_op or len(images)
    for indices in groups.values():
        for start in range(0, len(indices), step):
            chunk = indices[start : start + step]
            x = images[chunk[0]][None] if len(chunk) == 1 else torch.stack([images[i] for i in chunk])
            for i, pixels in zip(chunk, _pack_same_size(x, spec)):
                out[i] = pixels
    return out  # type: ignore[return-value]


class Qwen2VLDevicePreprocessor(DevicePreprocessor):
    """Images given as ``image_u8`` -> ``pixel_values`` + ``image_grid_thw`` on the device, the
    same-size images of one call packed together; every other item's tensors are moved as they are.
    Grids stay on the host: the tower reads them there (shapes, rotary positions, attention runs).

    The settings are the model folder's HF image processor's, read once here. A folder without
    one still serves text and precomputed embeddings (the front end, which reads the same
    settings, refuses pixel images then); ``image_u8`` items raise."""

    host_keys = frozenset({"image_grid_thw", "video_grid_thw"})

    def __init__(self, config: Any, device: torch.device) -> None:
        super().__init__(config, device)
        self.spec: QwenPixelSpec | None = None
        self._missing = ""
        try:
            from transformers import AutoImageProcessor

            ip = AutoImageProcessor.from_pretrained(config.model.model_dir)
        except Exception as exc:  # noqa: BLE001 - text and embeddings still work; pixel images are refused
            self._missing = f"{config.model.model_dir}: no usable image processor config ({exc})"
            logger.warning("%s; images given as pixels will be refused", self._missing)
        else:
            # The same choice as the front end's (Qwen2VLProcessor.use_fast): HF's rule, or vLLM's override.
            fast = resolve_use_fast(getattr(config.model, "mm_processor_kwargs", None), ip)
            self.spec = QwenPixelSpec.from_image_processor(ip, fast=fast)
            vision = getattr(getattr(config.model, "hf_config", None), "vision_config", None)
            if vision is not None:
                self.spec.check_against(vision)
        # One image per op on CPU (see pack_images); all same-size images at once elsewhere.
        self.max_images_per_op = 1 if torch.device(device).type == "cpu" else None
        # _upload's two pinned staging buffers, each with the event of the copy that last read it
        self._stages: list[tuple[torch.Tensor | None, torch.cuda.Event | None]] = [(None, None), (None, None)]
        self._stage_turn = 0

    def prepare(self, modality: str, items: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """``{"image_u8": [h, w, 3] uint8, "image_grid_thw": [1, 3]}`` -> ``{"pixel_values":
        [h/p * w/p, C*T*p*p] float32, "image_grid_thw": [1, 3]}`` on the device (the grid on the host); others moved."""
        todo = [i for i, d in enumerate(items) if "image_u8" in d] if modality == "image" else []
        if todo and self.spec is None:
            raise ValueError(f"multi_modal_data: image given as pixels, but {self._missing}")
        for i in todo:  # grid [1, 3] (t, h, w) in patches, from the front end, vs the pixels' size
            d = items[i]
            h, w = d["image_u8"].shape[:2]
            want = [1, h // self.spec.patch_size, w // self.spec.patch_size]  # type: ignore[union-attr]
            if torch.as_tensor(d["image_grid_thw"]).reshape(-1).tolist() != want:
                raise ValueError(
                    f"image_grid_thw: {torch.as_tensor(d['image_grid_thw']).tolist()} does not match image_u8 of {w}x{h} (expected {want})"
                )
        pixel_items = set(todo)
        out = super().prepare(modality, [{k: v for k, v in d.items() if k != "image_u8"} if i in pixel_items else d
                                         for i, d in enumerate(items)])
        if todo:
            u8 = self._upload([torch.as_tensor(items[i]["image_u8"]) for i in todo])
            pixels = pack_images(u8, self.spec, max_images_per_op=self.max_images_per_op)
            for i, pv in zip(todo, pixels):
                out[i] = {"pixel_values": pv, "image_grid_thw": out[i]["image_grid_thw"]}  # pv: [P_i, C*T*p*p]
        return out

    def _upload(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host uint8 images -> the same on the device: copied into one of two persistent pinned
        staging buffers (used in turn, each refilled only once the copy that read it is done)
        and sent in one copy. Pinning each image, or a fresh buffer per pass, cost 10-30 ms of
        host time a W1 step on the H100 machine: time the device sat idle. (Having the front end
        return pinned pixels instead, to skip this copy, measured slower: pinned allocations
        per image cost the feeder more than the copy saves.)"""
        if self.device.type != "cuda" or len(images) == 1:
            return [to_device_async(im, self.device) for im in images]
        sizes = [im.numel() for im in images]
        total = sum(sizes)
        self._stage_turn = turn = 1 - self._stage_turn
        buf, done = self._stages[turn]
        if done is not None:
            done.synchronize()  # the copy of two uploads ago: finished long since
        if buf is None or buf.numel() < total:
            buf = torch.empty(max(total, 2 * (0 if buf is None else buf.numel())), dtype=torch.uint8, pin_memory=True)
        host = buf[:total]
        torch.cat([im.reshape(-1) for im in images], out=host)
        dev = host.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._stages[turn] = (buf, event)
        return [v.view(im.shape) for v, im in zip(dev.split(sizes), images)]
