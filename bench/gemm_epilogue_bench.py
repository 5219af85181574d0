"""GEMM + activation on the W1 prefill shapes: cuBLAS then the activation kernel (what the models
run without kernels/triton_gemm.py) against the fused Triton GEMM, per launch config.

    PYTHONPATH=. python3 bench/gemm_epilogue_bench.py [--iters 50]

Cases (Qwen2-VL-2B, W1 steps of 16,384 tokens = ~55 images of 1,024 patches):
  * vision fc1 + quick_gelu: [P, 1280] x [5120, 1280] + bias, P = 32,768 and 56,320;
  * LM gate_up + silu-and-mul: [T, 1536] x [2 x 8960, 1536], T = 9,536 and 16,384.
Each is also timed with the plain Triton GEMM (act "none") against cuBLAS alone, to separate the
GEMM's own speed from what the fusion saves. Median of CUDA-event timings after warm-up; the
max error of each fused config against the unfused path is recorded. Prints a table and writes
JSON to $OUT/gemm_epilogue.json (or bench/results/gemm_epilogue.json).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.gpu_throughput import cuda_timed
from kernels import fused_ops
from kernels import triton_gemm as tg

C = tg.GemmConfig
# the three best of a wider sweep on the H100 (bench/results/gemm_epilogue_h100.json), per kind
CONFIGS = [C(128, 256, 64, 4, 8), C(128, 256, 32, 4, 8), C(128, 256, 64, 3, 8)]
GATED_CONFIGS = [C(128, 128, 64, 4, 8), C(128, 128, 64, 3, 8), C(128, 128, 32, 4, 8)]


def timed(fn, iters: int) -> float:
    """Median milliseconds (bench.gpu_throughput.cuda_timed)."""
    return 1e3 * cuda_timed(fn, iters)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args()
    dev = torch.device("cuda")
    dt = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    cases = []
    for m in (32768, 56320):
        cases.append(("quick_gelu", m, 5120, 1280, True))
    for m in (9536, 16384):
        cases.append(("gate_up_silu", m, 8960, 1536, False))
    rows = []
    for act, m, n, k, has_bias in cases:
        gated = act == "gate_up_silu"
        x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
        w = (torch.randn(2 * n if gated else n, k, device=dev, dtype=dt, generator=g) / k ** 0.5).to(dt)
        b = torch.randn(n, device=dev, dtype=dt, generator=g) * 0.1 if has_bias else None
        if gated:
            def unfused():
                return fused_ops.silu_and_mul(F.linear(x, w))
            gemm_only = lambda: F.linear(x, w)  # noqa: E731
            flops = 2 * m * 2 * n * k
        else:
            def unfused():
                return fused_ops.quick_gelu(F.linear(x, w, b))
            gemm_only = lambda: F.linear(x, w, b)  # noqa: E731
            flops = 2 * m * n * k
        ref = unfused().float()
        t_unfused = timed(unfused, args.iters)
        t_cublas = timed(gemm_only, args.iters)
        row = dict(act=act, m=m, n=n, k=k, cublas_gemm_ms=t_cublas, cublas_plus_act_ms=t_unfused,
                   cublas_tflops=flops / t_cublas / 1e9, configs=[])
        for cfg in GATED_CONFIGS if gated else CONFIGS:
            try:
                if gated:
                    fn = lambda cfg=cfg: tg.gate_up_silu(x, w, cfg)  # noqa: E731
                else:
                    fn = lambda cfg=cfg: tg.linear_act(x, w, b, act, cfg)  # noqa: E731
                err = (fn().float() - ref).abs().max().item()
                t = timed(fn, args.iters)
                plain = None
                if not gated:
                    plain = timed(lambda cfg=cfg: tg.linear_act(x, w, b, "none", cfg), args.iters)
                row["configs"].append(dict(cfg=list(cfg.__dict__.values()), fused_ms=t, plain_gemm_ms=plain,
                                           max_abs_err_vs_unfused=err, fused_tflops=flops / t / 1e9))
                print(f"{act:13s} M={m:6d} {cfg} fused {t:.3f} ms (plain {plain if plain is None else round(plain, 3)})"
                      f" vs cuBLAS+act {t_unfused:.3f} (cuBLAS {t_cublas:.3f}); err {err:.3g}", flush=True)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile / fit: recorded
                row["configs"].append(dict(cfg=list(cfg.__dict__.values()), error=str(exc)[:300]))
                print(f"{act} M={m} {cfg}: {str(exc)[:200]}", flush=True)
        ok = [c for c in row["configs"] if "fused_ms" in c]
        if ok:
            best = min(ok, key=lambda c: c["fused_ms"])
            row["best"] = best
            row["speedup_vs_cublas_plus_act"] = t_unfused / best["fused_ms"]
        rows.append(row)
    print("\n| op | M | N | K | cuBLAS | cuBLAS + act | fused best | config | speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        b = r.get("best", {})
        print(f"| {r['act']} | {r['m']} | {r['n']} | {r['k']} | {r['cublas_gemm_ms']:.3f} | {r['cublas_plus_act_ms']:.3f} | "
              f"{b.get('fused_ms', float('nan')):.3f} | {b.get('cfg')} | {r.get('speedup_vs_cublas_plus_act', 0):.2f} |")
    out = Path(os.environ["OUT"]) / "gemm_epilogue.json" if os.environ.get("OUT") else Path("bench/results/gemm_epilogue.json")
    out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                   triton=__import__("triton").__version__, cases=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
