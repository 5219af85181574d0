"""The vision tower's time per image against the size of the graph-replayed chunks it runs in.

W1's vision passes replay CUDA graphs of chunks of same-size images (``EncoderGraphCache``,
``chunk_patches``, 16 images of 1024 patches by default). A chunk's activations ([patches, 1280]
bf16 each, [patches, 5120] for the MLP) outgrow the GPU's L2 (50 MB on the H100, 60 MB on the
H200) at a few images, so the bandwidth-bound kernels between the GEMMs (LayerNorm, rotary,
quick_gelu) read and write device memory; in smaller chunks they would stay in L2, while the GEMMs
get fewer rows each. Which wins is measured here, on our Qwen2-VL-2B-shaped tower (random bf16
weights) over one pass of ``--images`` 448x448 images, for each chunk size; outputs are checked
against the default chunking's.

    PYTHONPATH=. python3 bench/vision_pass_bench.py [--images 32 --chunks 1,2,4,8,16,32]

Prints a table and writes JSON to $OUT/vision_pass.json (or bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from bench.gpu_throughput import VISION_2B, cuda_timed
from engine.cuda_graphs import EncoderGraphCache
from engine.models.qwen2_vl import Qwen2VisionTransformer


def build_tower(device: torch.device, dtype: torch.dtype):
    import transformers

    cfg = transformers.Qwen2VLConfig(vision_config=dict(
        depth=VISION_2B["depth"], embed_dim=VISION_2B["embed_dim"], num_heads=VISION_2B["num_heads"],
        mlp_ratio=4, hidden_act="quick_gelu", patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        in_channels=3, hidden_size=VISION_2B["hidden_size"])).vision_config
    with torch.device(device):
        tower = Qwen2VisionTransformer(cfg).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in tower.named_parameters():  # LayerNorm weights 1, everything else N(0, 0.02)
            p.fill_(1.0) if name.endswith(("norm1.weight", "norm2.weight", "ln_q.weight")) else p.normal_(0.0, 0.02, generator=g)
    return tower.eval()


def mlp_rows(tower, rows: int, chunks: list[int], iters: int) -> list[dict]:
    """One block's MLP (fc1 -> quick_gelu -> fc2) over ``rows`` patches at once, and over the same
    rows cut into chunks of each size (eager: every kernel here is long against its launch)."""
    mlp = tower.blocks[0].mlp
    x = torch.randn(rows, mlp.fc1.in_features, device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype)
    ref = mlp(x).float()
    out = []
    for c in [rows, *chunks]:
        fn = (lambda: mlp(x)) if c == rows else (lambda c=c: torch.cat([mlp(x[i:i + c]) for i in range(0, rows, c)]))
        y = fn().float()
        out.append({"rows": rows, "chunk_rows": c, "ms": cuda_timed(fn, iters) * 1e3,
                    "rel_err": ((y - ref).norm() / ref.norm()).item()})
        print(out[-1], flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--grid", type=int, default=32, help="patches per side (448 / 14)")
    p.add_argument("--chunks", default="1,2,4,8,16,32", help="images per replayed chunk")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--mlp-rows", type=int, default=16384)
    p.add_argument("--mlp-chunks", default="1024,2048,4096,8192")
    args = p.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    tower = build_tower(dev, dtype)
    n = args.grid * args.grid
    grid = [[1, args.grid, args.grid]] * args.images
    pixels = torch.randn(args.images * n, 3 * 2 * 14 * 14, device=dev, dtype=dtype)
    rows: list[dict] = []
    ref = None
    with torch.inference_mode():
        eager = lambda: tower(pixels, grid)  # noqa: E731
        ms = cuda_timed(eager, args.iters) * 1e3
        ref = eager().float()
        rows.append({"chunk_images": args.images, "mode": "eager, one pass", "ms": ms, "ms_per_image": ms / args.images})
        print(rows[-1], flush=True)
        for c in [int(x) for x in args.chunks.split(",") if x]:
            cache = EncoderGraphCache(tower, max_patches=0, chunk_patches=c * n)
            fn = lambda cache=cache: cache(pixels, grid)  # noqa: E731
            out = fn().float()
            ms = cuda_timed(fn, args.iters) * 1e3
            rows.append({"chunk_images": c, "mode": "graphs", "ms": ms, "ms_per_image": ms / args.images,
                         "rel_err_vs_eager": ((out - ref).norm() / ref.norm()).item()})
            print(rows[-1], flush=True)
            del cache
            torch.cuda.empty_cache()
        mlp = mlp_rows(tower, args.mlp_rows, [int(x) for x in args.mlp_chunks.split(",") if x], args.iters * 5)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "images": args.images,
              "patches_per_image": n, "rows": rows, "mlp": mlp}
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "vision_pass.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"| images per chunk | mode | ms for {args.images} images | ms per image |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['chunk_images']} | {r['mode']} | {r['ms']:.2f} | {r['ms_per_image']:.3f} |")
    print("| MLP rows | chunk rows | ms |\n|---|---|---|")
    for r in mlp:
        print(f"| {r['rows']} | {r['chunk_rows']} | {r['ms']:.3f} |")


if __name__ == "__main__":
    main()
