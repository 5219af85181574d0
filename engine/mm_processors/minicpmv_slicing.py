"""MiniCPM-V 2.6 image slicing: the best grid, the resized overview and slices, the placeholder text.

What the published ``MiniCPMVImageProcessor`` does to one image (``slice_mode``, version 2.6):

* grid (``sliced_grid``): with ``ratio = W*H / scale_resolution**2`` and
  ``multiple = min(ceil(ratio), max_slice_nums)``, an image with ``multiple <= 1`` is not sliced;
  otherwise every ``cols x rows`` factorisation of ``multiple - 1``, ``multiple`` and
  ``multiple + 1`` (1 and counts above ``max_slice_nums`` excluded) is a candidate, and the one
  whose ``log(cols / rows)`` is closest to ``log(W / H)`` wins (the first one on ties).
* overview (``best_resize``): an image larger than ``scale_resolution**2`` pixels (or any image,
  when it is not sliced) is scaled to about that area keeping its aspect ratio, then each side is
  rounded to a multiple of ``patch_size`` (at least one patch); PIL bicubic.
* slices: the image is resized (bicubic) to ``refine_size`` — per grid cell the best size of a
  cell of the image, upscaling allowed, times the grid — and cut row-major into ``cols x rows``
  equal cells.
* placeholder text for image ``idx`` (0-based in its prompt): ``<image_id>idx</image_id>`` (when
  ``use_image_id``), ``<image>`` + ``query_num`` x ``<unk>`` + ``</image>``, then per grid row
  ``cols`` x (``<slice>`` + ``query_num`` x ``<unk>`` + ``</slice>``), rows joined by ``"\\n"``.

All sizes are (width, height), as PIL and the published code write them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SliceConfig:
    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    query_num: int = 64  # <unk> tokens (resampler outputs) per overview / slice
    use_image_id: bool = True


def _ensure_divide(length: float, unit: int) -> int:
    """``length`` rounded to a multiple of ``unit``, at least ``unit``."""
    return max(round(length / unit) * unit, unit)


def best_resize(size: tuple[float, float], cfg: SliceConfig, allow_upscale: bool = False) -> tuple[int, int]:
    """(width, height) an image (or grid cell) of ``size`` is resized to."""
    width, height = size
    if width * height > cfg.scale_resolution * cfg.scale_resolution or allow_upscale:
        r = width / height
        height = int(cfg.scale_resolution / math.sqrt(r))
        width = int(height * r)
    return _ensure_divide(width, cfg.patch_size), _ensure_divide(height, cfg.patch_size)


def refine_size(size: tuple[int, int], grid: tuple[int, int], cfg: SliceConfig) -> tuple[int, int]:
    """(width, height) of the image the ``grid`` (cols, rows) of slices is cut from."""
    cols, rows = grid
    cell = (_ensure_divide(size[0], cols) / cols, _ensure_divide(size[1], rows) / rows)
    cell_w, cell_h = best_resize(cell, cfg, allow_upscale=True)
    return cell_w * cols, cell_h * rows


def sliced_grid(size: tuple[int, int], cfg: SliceConfig) -> tuple[int, int] | None:
    """The (cols, rows) grid of slices of a ``size`` image, or None when it is not sliced."""
    width, height = size
    multiple = min(math.ceil(width * height / (cfg.scale_resolution * cfg.scale_resolution)), cfg.max_slice_nums)
    if multiple <= 1:
        return None
    log_ratio = math.log(width / height)
    best, best_err = (1, 1), float("inf")
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > cfg.max_slice_nums:
            continue
        for cols in range(1, count + 1):
            if count % cols:
                continue
            err = abs(log_ratio - math.log(cols / (count // cols)))
            if err < best_err:  # strict: the first candidate wins ties, as published
                best, best_err = (cols, count // cols), err
    return best


def num_slices(size: tuple[int, int], cfg: SliceConfig) -> int:
    """Overview + grid cells: the number of ``query_num``-token runs of a ``size`` image."""
    grid = sliced_grid(size, cfg)
    return 1 + (grid[0] * grid[1] if grid else 0)


def placeholder_text(size: tuple[int, int], index: int, cfg: SliceConfig) -> str:
    """The text image ``index`` of a prompt is replaced with (see the module docstring)."""
    unks = "<unk>" * cfg.query_num
    text = (f"<image_id>{index}</image_id>" if cfg.use_image_id else "") + f"<image>{unks}</image>"
    grid = sliced_grid(size, cfg)
    if grid is not None:
        cols, rows = grid
        text += "\n".join(f"<slice>{unks}</slice>" * cols for _ in range(rows))
    return text


def slice_images_u8(image: Any, cfg: SliceConfig) -> list[np.ndarray]:
    """An RGB PIL image -> uint8 [h, w, 3] arrays: the overview, then the slices row-major; every
    side a multiple of ``patch_size``."""
    from PIL import Image

    size = image.size
    grid = sliced_grid(size, cfg)
    bicubic = Image.Resampling.BICUBIC
    overview = image.resize(best_resize(size, cfg, allow_upscale=grid is None), resample=bicubic)
    out = [np.array(overview, dtype=np.uint8)]
    if grid is not None:
        cols, rows = grid
        refined = np.array(image.resize(refine_size(size, grid, cfg), resample=bicubic), dtype=np.uint8)
        cell_h, cell_w = refined.shape[0] // rows, refined.shape[1] // cols
        out += [np.ascontiguousarray(refined[r * cell_h:(r + 1) * cell_h, c * cell_w:(c + 1) * cell_w])
                for r in range(rows) for c in range(cols)]
    return out
