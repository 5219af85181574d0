"""Qwen2-VL / Qwen2.5-VL video preprocessing, without torchvision.

Frames in (a list of PIL images, or a ``(T, H, W, 3)`` uint8 array), vision-tower inputs out:
``pixel_values_videos`` [t*h*w, C*T*p*p] float32 and ``video_grid_thw`` [[t, h, w]] (in patches),
laid out exactly as HF's ``Qwen2VLVideoProcessor`` lays them out:

1. Every frame is resized to the same ``smart_resize(H, W, factor=patch*merge, min_pixels,
   max_pixels)`` size (both sides multiples of patch*merge, area within [min, max] pixels,
   aspect ratio kept), BICUBIC. HF resizes video frames with torchvision: with ``fast`` (where
   torchvision is importable, or ``use_fast`` is true: ``qwen2_vl_fast.video_use_fast``) the
   frames are resized as HF's video processor resizes them (torch's uint8 interpolate on the
   [T, C, H, W] frames, ``qwen2_vl_fast.resize_u8``), bit for bit; without it PIL does it, as
   HF's PIL image processor does for images (HF itself has no video path without torchvision).
2. Rescale and normalize: with ``fast``, HF's fused float32 ``(x - mean / rescale_factor) /
   (std / rescale_factor)``; else x * 1/255 in float64 then cast to float32, and (x - mean) / std
   in float32, as HF's PIL image processor does.
3. The frame count is padded to a multiple of ``temporal_patch_size`` by repeating the last
   frame (HF's ``patchify``), then frames are cut into ``temporal_patch_size x p x p`` patches
   ordered by (t, h-block, w-block, h-in-block, w-in-block), each flattened as (C, T, p, p).

No frame sampling: the frames given are the frames encoded (HF's ``do_sample_frames`` defaults to
False for Qwen2-VL too), and no per-video pixel cap beyond ``max_pixels`` per frame (HF's
``cap_pixels_per_frame`` defaults to off).

The settings come from the model folder as HF's ``AutoVideoProcessor`` finds them:
``processor_config.json["video_processor"]``, else ``video_preprocessor_config.json``, else
``preprocessor_config.json``; missing keys take ``Qwen2VLVideoProcessor``'s defaults
(min_pixels 128*28*28, max_pixels 28*28*768, patch 14, temporal patch 2, merge 2, CLIP mean/std).

Input bounds (raise ValueError naming ``multi_modal_data`` and the video): at most
``max_frames`` frames per video (default 256), at most ``max_total_pixels`` input pixels per
video summed over frames (default 256 full-HD frames), and the video's token count must fit
``max_model_len`` — checked from the frame size before any pixel is resized.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.mm_processors.qwen2_vl_fast import fused_mean_std, resize_u8, torch_resize_mode

DEFAULT_FPS = 2.0  # what HF's Qwen2.5-VL processor assumes when the frames' fps is not given
DEFAULT_MAX_FRAMES = 256
DEFAULT_MAX_TOTAL_PIXELS = 256 * 1920 * 1080

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BICUBIC = 3


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides multiples of ``factor``, area in [min_pixels, max_pixels],
    aspect ratio kept as closely as possible (same arithmetic as HF's ``smart_resize``)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class QwenVideoConfig:
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 28 * 28 * 768
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = _CLIP_MEAN
    image_std: tuple[float, ...] = _CLIP_STD
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = _BICUBIC
    source: str = "defaults"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "dict") -> QwenVideoConfig:
        """From a (video or image) processor config dict, with HF's key precedence: ``min_pixels`` /
        ``max_pixels`` override ``size``'s ``shortest_edge`` / ``longest_edge``."""
        base = cls()
        size = d.get("size") if isinstance(d.get("size"), dict) else {}
        min_pixels = d.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or base.min_pixels
        max_pixels = d.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or base.max_pixels

        def tup(key: str, default: tuple[float, ...]) -> tuple[float, ...]:
            v = d.get(key)
            if v is None:
                return default
            return tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))

        return cls(
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            patch_size=int(d.get("patch_size") or base.patch_size),
            temporal_patch_size=int(d.get("temporal_patch_size") or base.temporal_patch_size),
            merge_size=int(d.get("merge_size") or base.merge_size),
            image_mean=tup("image_mean", base.image_mean),
            image_std=tup("image_std", base.image_std),
            rescale_factor=float(d.get("rescale_factor", base.rescale_factor)),
            do_rescale=bool(d.get("do_rescale", True)),
            do_normalize=bool(d.get("do_normalize", True)),
            resample=int(d.get("resample", _BICUBIC) if isinstance(d.get("resample", _BICUBIC), int) else _BICUBIC),
            source=source,
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> QwenVideoConfig:
        root = Path(model_dir)
        proc = root / "processor_config.json"
        if proc.is_file():
            nested = _read_json(proc).get("video_processor")
            if isinstance(nested, dict):
                return cls.from_dict(nested, f"{proc}['video_processor']")
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            path = root / name
            if path.is_file():
                return cls.from_dict(_read_json(path), str(path))
        return cls()

    def check_against(self, vision_config: Any) -> None:
        """The vision tower's patch geometry must be the one the pixels are cut into."""
        for ours, theirs in (
            ("patch_size", "patch_size"),
            ("temporal_patch_size", "temporal_patch_size"),
            ("merge_size", "spatial_merge_size"),
        ):
            want = getattr(vision_config, theirs, None)
            if want is not None and int(want) != getattr(self, ours):
                raise ValueError(
                    f"{self.source}: {ours}={getattr(self, ours)} does not match the model's "
                    f"vision_config.{theirs}={want}"
                )
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"{self.source}: need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: could not be read: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _is_pil(obj: Any) -> bool:
    return hasattr(obj, "mode") and hasattr(obj, "size") and hasattr(obj, "convert")


def to_frames(video: Any, what: str) -> list[Any]:
    """A video as a list of same-size RGB PIL frames. ``video``: a list/tuple of PIL images or of
    (H, W, 3) uint8 arrays, or a (T, H, W, 3) uint8 array / tensor."""
    from PIL import Image

    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"{what}: a video array must have shape (T, H, W, 3), got {video.shape}")
        video = list(video)
    if not isinstance(video, (list, tuple)):
        raise ValueError(
            f"{what}: expected a list of PIL images (frames) or a (T, H, W, 3) uint8 array, got {type(video).__name__}"
        )
    if not video:
        raise ValueError(f"{what}: the video has no frames")
    frames = []
    for i, f in enumerate(video):
        if _is_pil(f):
            try:
                frames.append(f.convert("RGB"))
            except Exception as exc:  # truncated or corrupt image data surfaces here
                raise ValueError(f"{what}: frame {i} could not be decoded: {exc}") from exc
        elif isinstance(f, np.ndarray):
            if f.ndim != 3 or f.shape[-1] != 3 or f.dtype != np.uint8:
                raise ValueError(f"{what}: frame {i}: expected a (H, W, 3) uint8 array, got {f.shape} {f.dtype}")
            if f.shape[0] == 0 or f.shape[1] == 0:
                raise ValueError(f"{what}: frame {i} is empty ({f.shape})")
            frames.append(Image.fromarray(np.ascontiguousarray(f), "RGB"))
        else:
            raise ValueError(f"{what}: frame {i}: expected a PIL image or a (H, W, 3) uint8 array, got {type(f).__name__}")
    size = frames[0].size
    for i, f in enumerate(frames):
        if f.size != size:
            raise ValueError(f"{what}: all frames must have the same size; frame 0 is {size}, frame {i} is {f.size} (W, H)")
    return frames


class QwenVideoPreprocessor:
    """Frames -> (pixel_values_videos, video_grid_thw), with input bounds (see the module doc)."""

    def __init__(
        self,
        config: QwenVideoConfig,
        *,
        max_frames: int = DEFAULT_MAX_FRAMES,
        max_total_pixels: int = DEFAULT_MAX_TOTAL_PIXELS,
        fast: bool = False,
    ) -> None:
        if fast:
            torch_resize_mode(config.resample)  # a filter without a torch mode fails at load
        self.fast = fast
        if max_frames < 1:
            raise ValueError(f"max_video_frames: must be >= 1, got {max_frames}")
        if max_total_pixels < 1:
            raise ValueError(f"max_video_pixels: must be >= 1, got {max_total_pixels}")
        self.config = config
        self.max_frames = max_frames
        self.max_total_pixels = max_total_pixels

    def grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) in patches of a video of ``num_frames`` frames of height x width."""
        c = self.config
        rh, rw = smart_resize(height, width, c.factor, c.min_pixels, c.max_pixels)
        t = -(-num_frames // c.temporal_patch_size)
        return t, rh // c.patch_size, rw // c.patch_size

    def num_tokens(self, num_frames: int, height: int, width: int) -> int:
        t, h, w = self.grid(num_frames, height, width)
        return t * h * w // self.config.merge_size**2

    def check(self, num_frames: int, height: int, width: int, what: str) -> None:
        if num_frames > self.max_frames:
            raise ValueError(
                f"{what}: {num_frames} frames exceed the limit of {self.max_frames} frames per video (max_video_frames)"
            )
        total = num_frames * height * width
        if total > self.max_total_pixels:
            raise ValueError(
                f"{what}: {num_frames} frames of {width}x{height} are {total} pixels, more than the limit of "
                f"{self.max_total_pixels} pixels per video (max_video_pixels)"
            )

    def _pil_frames(self, frames: list[Any], rh: int, rw: int, padded: int) -> torch.Tensor:
        """PIL resize, float64 rescale, float32 normalize: float32 [padded, rh, rw, 3], the first
        len(frames) filled."""
        from PIL import Image

        c = self.config
        mean = torch.tensor(c.image_mean, dtype=torch.float32)
        std = torch.tensor(c.image_std, dtype=torch.float32)
        out = torch.empty(padded, rh, rw, 3, dtype=torch.float32)  # frames, H, W, C
        for i, f in enumerate(frames):
            resized = f if f.size == (rw, rh) else f.resize((rw, rh), resample=Image.Resampling(c.resample))
            x = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())
            x = (x.double() * c.rescale_factor).float() if c.do_rescale else x.float()
            out[i] = (x - mean) / std if c.do_normalize else x
        return out

    def _fast_frames(self, frames: list[Any], rh: int, rw: int, padded: int) -> torch.Tensor:
        """HF's video processor: np.stack of the frames -> contiguous uint8 [T, C, H, W], one
        interpolate over all frames, fused float32 rescale / normalize. Returns float32 [padded,
        rh, rw, 3] (channels last, as ``_pil_frames``), the first len(frames) filled."""
        c = self.config
        x = torch.from_numpy(np.stack([np.asarray(f, dtype=np.uint8) for f in frames]))
        x = resize_u8(x.permute(0, 3, 1, 2).contiguous(), rh, rw, torch_resize_mode(c.resample))
        if c.do_rescale and c.do_normalize:
            mean, std = fused_mean_std(c.image_mean, c.image_std, c.rescale_factor)
            y = x.float().sub_(mean).div_(std)
        elif c.do_normalize:
            mean, std = fused_mean_std(c.image_mean, c.image_std, 1.0)
            y = x.float().sub_(mean).div_(std)
        else:
            y = x * c.rescale_factor if c.do_rescale else x.float()
        out = torch.empty(padded, rh, rw, 3, dtype=torch.float32)
        out[: len(frames)] = y.permute(0, 2, 3, 1)
        return out

    def __call__(self, video: Any, what: str = "video", max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One video -> (pixel_values_videos [t*h*w, C*T*p*p] float32, video_grid_thw [[t, h, w]] int64)."""
        if isinstance(video, (np.ndarray, torch.Tensor)) and video.ndim == 4:  # bound before any copy
            self.check(int(video.shape[0]), int(video.shape[1]), int(video.shape[2]), what)
        elif isinstance(video, (list, tuple)) and len(video) > self.max_frames:
            self.check(len(video), 1, 1, what)
        frames = to_frames(video, what)
        width, height = frames[0].size
        self.check(len(frames), height, width, what)
        c = self.config
        try:
            rh, rw = smart_resize(height, width, c.factor, c.min_pixels, c.max_pixels)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        tp = c.temporal_patch_size
        gt, gh, gw = -(-len(frames) // tp), rh // c.patch_size, rw // c.patch_size
        if max_tokens is not None and (n := gt * gh * gw // c.merge_size**2) > max_tokens:
            raise ValueError(f"{what}: needs {n} placeholder tokens ({len(frames)} frames of {width}x{height}), "
                             f"more than max_model_len allows ({max_tokens})")

        if self.fast:
            out = self._fast_frames(frames, rh, rw, gt * tp)
        else:
            out = self._pil_frames(frames, rh, rw, gt * tp)
        if len(frames) < gt * tp:  # pad the frame count by repeating the last frame
            out[len(frames):] = out[len(frames) - 1]
        p, m = c.patch_size, c.merge_size
        x = out.permute(0, 3, 1, 2)  # [T, C, H, W]
        x = x.reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, hb, wb, hm, wm, C, T, p, p
        pixels = x.reshape(gt * gh * gw, 3 * tp * p * p).contiguous()
        return pixels, torch.tensor([[gt, gh, gw]], dtype=torch.int64)
