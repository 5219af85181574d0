"""On a machine with torchvision and a GPU: the engine's Qwen2-VL pixels vs HF's, as users run HF.

HF side: ``AutoImageProcessor`` with its default (the torchvision backend where torchvision is
installed) on the CPU, and the PIL backend explicitly. Engine side: the front end's resize on the
host (``image_to_u8``), then rescale / normalize / patch layout on the GPU (``pack_images``), with
the path ``resolve_use_fast`` picks (and the PIL one). Prints, per image size, whether the
``pixel_values`` are bit-identical. Real Qwen2-VL processor settings.

    python bench/qwen_fast_pixels_device_check.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.mm_processors.qwen2_vl_fast import resolve_use_fast  # noqa: E402
from engine.mm_processors.qwen2_vl_pixels import QwenPixelSpec, pack_images  # noqa: E402
from engine.mm_processors.qwen2_vl_resize import QwenResizeSpec, image_to_u8  # noqa: E402

SIZES = [(448, 448), (480, 640), (768, 1024), (1080, 1920), (100, 150), (60, 300), (333, 517)]
CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "resample": 3,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def main() -> None:
    import transformers
    from PIL import Image
    from transformers import AutoImageProcessor

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = Path(tempfile.mkdtemp())
    (folder / "preprocessor_config.json").write_text(json.dumps(CONFIG))
    default = AutoImageProcessor.from_pretrained(str(folder))
    pil = AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    fast = resolve_use_fast(None, default)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}; "
          f"HF default backend {getattr(default, 'backend', '?')} -> engine use_fast={fast}")
    ok = True
    for h, w in SIZES:
        img = Image.fromarray(np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        line = [f"{w}x{h}"]
        for name, ip, use_fast in (("default", default, fast), ("pil", pil, False)):
            want = ip(images=[img], return_tensors="pt")["pixel_values"]
            u8 = torch.from_numpy(image_to_u8(img, QwenResizeSpec.from_image_processor(ip, fast=use_fast)))
            got = pack_images([u8.to(device)], QwenPixelSpec.from_image_processor(ip, fast=use_fast))[0].cpu()
            same = got.shape == want.shape and torch.equal(got, want)
            ok &= same
            line.append(f"{name}: {'equal' if same else 'DIFFERENT'}"
                        + ("" if same or got.shape != want.shape else f" (max {(got - want).abs().max().item():.3g})"))
        print("  ".join(line))
    print("ALL EQUAL" if ok else "SOME DIFFER")


if __name__ == "__main__":
    main()
