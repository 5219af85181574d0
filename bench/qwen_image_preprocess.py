"""Per-image host CPU cost of Qwen2-VL image preprocessing: the PIL path vs the fast (torch) path.

What the front end does per image (``image_to_u8``: RGB conversion + resize to the smart_resize
size, as HF's PIL or fast processor resizes) and what the device preprocessor does on CPU
(``pack_images``: rescale / normalize / patch layout; on a GPU that part runs there). Real
Qwen2-VL settings (min_pixels 56*56, max_pixels 28*28*1280, patch 14, merge 2, BICUBIC).

    python bench/qwen_image_preprocess.py [--repeat 200] [--threads 1]

Sizes: W1's 448x448 (a multiple of 28: no resize in either path), and images that are resized
(640x480 -> 644x476, 1024x768 -> 1036x756, 1920x1080 -> 1316x728 under max_pixels).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from engine.mm_processors.qwen2_vl_pixels import QwenPixelSpec, pack_images
from engine.mm_processors.qwen2_vl_resize import QwenResizeSpec, image_to_u8

SIZES = [(448, 448), (480, 640), (768, 1024), (1080, 1920)]


def _time(fn, repeat: int) -> float:
    fn()  # warm up (allocator, kernels' first-call setup)
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the front end runs one per process)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from PIL import Image

    base = dict(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 1280, resample=3)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, threads={args.threads}; median ms per image")
    print(f"{'size (WxH)':>12} {'->':>2} {'target':>10} | {'resize PIL':>10} {'resize fast':>11} | "
          f"{'pack PIL':>8} {'pack fast':>9}")
    for h, w in SIZES:
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        row = []
        for fast in (False, True):
            spec = QwenResizeSpec(**base, fast=fast)
            row.append(_time(lambda: image_to_u8(img, spec), args.repeat))
        u8 = torch.from_numpy(image_to_u8(img, QwenResizeSpec(**base)))
        for fast in (False, True):
            pspec = QwenPixelSpec(fast=fast)
            row.append(_time(lambda: pack_images([u8], pspec, max_images_per_op=1), args.repeat))
        th, tw = u8.shape[:2]
        print(f"{w:>5}x{h:<6} -> {tw:>4}x{th:<5} | {row[0]:>10.3f} {row[1]:>11.3f} | {row[2]:>8.3f} {row[3]:>9.3f}")


if __name__ == "__main__":
    main()
