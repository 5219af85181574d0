"""HF's "fast" (torchvision-backend) Qwen2-VL image arithmetic, in plain torch (no torchvision).

transformers 5.x has two Qwen2-VL image processors, and ``AutoImageProcessor`` picks the
torchvision one (``Qwen2VLImageProcessor``, a ``TorchvisionBackend``) whenever torchvision is
importable, else the PIL one (``Qwen2VLImageProcessorPil``); ``use_fast`` / ``backend`` picks
explicitly. vLLM passes ``use_fast=True`` unless ``--mm-processor-kwargs '{"use_fast": false}'``.
The two give different ``pixel_values`` on resized images (1e-3 to 1e-2 relative), which changes
greedy tokens on models with real activation scales, so the engine reproduces whichever one HF
would run (``resolve_use_fast``).

What the torchvision backend computes (transformers 5.24, torchvision 0.28), reproduced here:

* resize: ``tvF.resize(uint8 [N, C, H, W] contiguous, (h, w), antialias=True)``, which only calls
  ``torch.nn.functional.interpolate``: on CPU directly on the uint8 tensor for bicubic / lanczos
  (torch's native uint8 kernels), for bilinear where the CPU has AVX2 / AVX512 (or is arm64), and
  for nearest; otherwise (GPU, bilinear without AVX2) through float32, then clamp (bicubic /
  lanczos), round and cast back. An image already of the target size is not touched.
* rescale + normalize, fused: ``(float32(x) - mean * (1 / rescale_factor)) / (std * (1 /
  rescale_factor))`` with mean / std float32 tensors (``_fuse_mean_std_and_rescale_factor`` +
  ``tvF.normalize``), where the PIL path computes ``float32(float64(x) * rescale_factor)``, then
  ``(x - mean) / std``. That runs where the vision tower runs (``qwen2_vl_pixels``).
* patchify: the same layout as the PIL path.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from typing import Any

import torch

# PIL resampling filter (HF's ``resample``) -> interpolate mode, as HF maps it to torchvision's
# InterpolationMode (``pil_torch_interpolation_mapping``) and torchvision passes ``mode.value`` on.
# BOX and HAMMING have no interpolate mode (torchvision fails on them as well).
_TORCH_MODES = {0: "nearest-exact", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
_PIL_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


def check_mm_processor_kwargs(kwargs: Any) -> dict[str, Any]:
    """vLLM's ``mm_processor_kwargs``, of which the engine honours ``use_fast`` (a bool). Other keys
    (HF processor call arguments such as ``min_pixels``) are refused rather than silently ignored."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"mm_processor_kwargs: expected an object such as {{\"use_fast\": false}}, got {kwargs!r}")
    unknown = sorted(set(kwargs) - {"use_fast"})
    if unknown:
        raise ValueError(f"mm_processor_kwargs: unsupported key(s) {', '.join(map(repr, unknown))}; supported: use_fast")
    if "use_fast" in kwargs and not isinstance(kwargs["use_fast"], bool):
        raise ValueError(f"mm_processor_kwargs: use_fast must be true or false, got {kwargs['use_fast']!r}")
    return dict(kwargs)


def torchvision_available() -> bool:
    """transformers' own test (torchvision installed, with PIL and torch), else an import probe."""
    try:
        from transformers.utils import is_torchvision_available
    except ImportError:  # pragma: no cover - transformers without that helper
        import importlib.util

        return importlib.util.find_spec("torchvision") is not None
    return bool(is_torchvision_available())


def resolve_use_fast(mm_processor_kwargs: Mapping[str, Any] | None, image_processor: Any = None) -> bool:
    """Whether HF would run its fast processor: ``use_fast`` when given (vLLM's override);
    else the backend HF's ``AutoImageProcessor`` actually loaded for the model folder (its own
    rule: torchvision when importable, with its exceptions and fallbacks); with no processor
    object, whether torchvision is importable."""
    use_fast = (mm_processor_kwargs or {}).get("use_fast")
    if use_fast is not None:
        return bool(use_fast)
    if image_processor is not None:
        backend = getattr(image_processor, "backend", None)
        if isinstance(backend, str):  # transformers 5.x: "torchvision" | "pil"
            return backend == "torchvision"
        return type(image_processor).__name__.endswith("Fast")  # 4.x: Qwen2VLImageProcessorFast
    return torchvision_available()


def video_use_fast(mm_processor_kwargs: Mapping[str, Any] | None) -> bool:
    """Whether video frames follow HF's video processor arithmetic (torch resize, fused
    normalize). HF has one Qwen2-VL video processor, a torchvision one: wherever torchvision is
    importable, HF's videos are that, whatever ``use_fast`` says (it picks image processors).
    Without torchvision HF cannot process videos at all; the engine keeps its PIL frames path
    there unless ``use_fast`` is true."""
    return bool((mm_processor_kwargs or {}).get("use_fast")) or torchvision_available()


def torch_resize_mode(resample: int) -> str:
    """The interpolate mode of HF's fast resize for a PIL ``resample`` filter; ValueError if none."""
    mode = _TORCH_MODES.get(int(resample))
    if mode is None:
        raise ValueError(
            f"image processor: resample={_PIL_NAMES.get(int(resample), resample)} has no torch interpolation "
            "for HF's fast (torchvision) processor; pass mm_processor_kwargs {\"use_fast\": false}"
        )
    return mode


def _native_uint8(mode: str, device: torch.device) -> bool:
    """torchvision's rule for interpolating uint8 as is (else through float32)."""
    if mode == "nearest-exact":
        return True
    if device.type != "cpu":
        return False
    if mode == "bilinear":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")
    return mode in ("bicubic", "lanczos")


def resize_u8(images: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """uint8 [..., C, H, W] -> uint8 [..., C, height, width] exactly as torchvision 0.28's
    ``resize_image(antialias=True)`` computes it (see the module doc). Same size: returned as is."""
    shape = images.shape
    channels, old_h, old_w = shape[-3:]
    if (old_h, old_w) == (height, width):
        return images
    x = images.reshape(-1, channels, old_h, old_w)
    strides = x.stride()
    if x.is_contiguous(memory_format=torch.channels_last) and x.shape[0] == 1 and x.numel() != strides[0]:
        # torchvision re-strides a single channels-last image so interpolate keeps that layout
        # (pytorch#68430); the same here, so the same kernel runs.
        x = x.as_strided((1, channels, old_h, old_w), [x.numel(), *strides[1:]])
    cast = not _native_uint8(mode, x.device)
    if cast:
        x = x.to(torch.float32)
    antialias = mode in ("bilinear", "bicubic", "lanczos")
    align = False if antialias else None
    x = torch.nn.functional.interpolate(x, size=[height, width], mode=mode, align_corners=align, antialias=antialias)
    if cast:
        if mode in ("bicubic", "lanczos"):
            x = x.clamp_(min=0, max=255)
        x = x.round_().to(torch.uint8)
    return x.reshape(*shape[:-3], channels, height, width)


def resize_hwc_u8(pixels: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """One uint8 [H, W, C] image -> uint8 [height, width, C], resized as HF's fast processor does:
    on its channel-first contiguous copy (``process_image``: ``permute(2, 0, 1).contiguous()``),
    the layout whose kernel HF runs."""
    chw = pixels.permute(2, 0, 1).contiguous()
    return resize_u8(chw, height, width, mode).permute(1, 2, 0).contiguous()


def fused_mean_std(
    mean: tuple[float, ...], std: tuple[float, ...], rescale_factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``_fuse_mean_std_and_rescale_factor``: float32 ``mean / rescale_factor`` and ``std /
    rescale_factor``, computed as HF does (a float32 tensor times the double ``1 / rescale_factor``)
    on the CPU, [C, 1, 1]."""
    scale = 1.0 / rescale_factor
    m = torch.tensor(list(mean), dtype=torch.float32) * scale
    s = torch.tensor(list(std), dtype=torch.float32) * scale
    return m.view(-1, 1, 1), s.view(-1, 1, 1)
