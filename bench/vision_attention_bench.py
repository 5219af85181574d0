"""The vision tower's attention on the GPU machine: torch SDPA's backends on Qwen2-VL-2B's shape.

Each W1 image is 1024 patches, 16 heads of head_dim 80; a vision pass attends within each image,
so one batched SDPA of [images, 16, 1024, 80] per layer, from q / k / v laid out as the tower
makes them ([patches, heads, 80] views of the fused qkv). head_dim 80 is no power of two: the
kernels pad it (cuDNN's to 128, FlashAttention-2's to 96), so which backend wins is measured here
rather than assumed, beside our Triton kernel (kernels/triton_vit_attention.py: 64 + 16, no
padding) in each of its launch configs. Each output is checked against the math backend in
float32.

    PYTHONPATH=. python3 bench/vision_attention_bench.py [--images 16]

Prints a table and writes JSON to $OUT/vision_attention.json (or bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.gpu_throughput import cuda_timed

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--patches", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=80)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    dev = torch.device("cuda")
    b, n, h, d = args.images, args.patches, args.heads, args.head_dim
    g = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(b * n, 3, h, d, device=dev, dtype=torch.bfloat16, generator=g)
    # as the tower passes them: q and k contiguous [P, H, D] (from the rotary), v a view of qkv
    qf, kf, vf = qkv[:, 0].contiguous(), qkv[:, 1].contiguous(), qkv[:, 2]
    q, k, v = (t.view(b, n, h, d).transpose(1, 2) for t in (qf, kf, vf))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flops = 4 * b * h * n * n * d
    from kernels.triton_vit_attention import CONFIGS, split_head_dim, vit_attention

    ref_rows = ref.transpose(1, 2).reshape(b * n, h, d)  # the Triton kernel's [P, H, D] layout
    runs = [(0, b * n, b, n)]
    rows = []

    def measure(name: str, fn, expected: torch.Tensor) -> None:
        row: dict = {"backend": name}
        try:
            out = fn()
            t = cuda_timed(fn, args.iters)
            row.update(ms=t * 1e3, tflops=flops / t / 1e12,
                       rel_err=((out.float() - expected).norm() / expected.norm()).item())
        except Exception as exc:  # noqa: BLE001 - a backend that refuses the shape, a config that does not fit
            row["error"] = str(exc).splitlines()[0][:200]
        rows.append(row)
        print(row, flush=True)

    for name, backend in BACKENDS.items():
        def sdpa(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        measure(name, sdpa, ref)
    split = "+".join(map(str, split_head_dim(d)))
    for cfg in CONFIGS:
        measure(f"triton {split}, (BLOCK_M, BLOCK_N, warps, stages, tma)={cfg}",
                lambda cfg=cfg: vit_attention(qf, kf, vf, runs, config=cfg), ref_rows)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "shape": {"images": b, "patches": n, "heads": h, "head_dim": d}, "rows": rows}
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("bench/results")
    (out / "vision_attention.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
