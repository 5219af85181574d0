"""Micro-benchmark: the skinny-M Triton GEMV (kernels/triton_gemv.py) vs cuBLAS (``F.linear``) on
Qwen2-VL-2B's decode linears (bf16), one CUDA GPU.

Shapes (N x K): qkv_proj 2048 x 1536 (+bias), o_proj 1536 x 1536, gate_up 17920 x 1536,
down_proj 1536 x 8960 (plain, and ``+silu`` from x [M, 2 * 8960]: cuBLAS after the separate
silu_and_mul kernel vs ``gemv_silu_mul``), lm_head 151936 x 1536; M in {1, 2, 4, 8}.

Per (shape, M): ``cublas`` (F.linear, after ``triton_fused.silu_and_mul`` for +silu), ``ours``
(what ``fused_ops.linear`` / ``silu_and_mul_linear`` dispatch to: the GEMV, the activation kernel
+ GEMV, or cuBLAS where the tuning table found it faster), ``gemv`` (the GEMV forced, table config;
for +silu also the unfused pair).

Timing: ``--calls`` back-to-back calls captured in one CUDA graph, replayed ``--replays`` times
(after warm-up); the median replay / calls = us per call. The calls rotate over enough copies of
the weight (>= 256 MB together) that every call reads its weight from HBM, as a decode step
does (a 6 MB weight would otherwise stay in the 50 MB L2). GB/s counts weight bytes only.

``--sweep`` (default on) also times candidate configs per (shape, M) (both kernels) and prints the
best ones as entries for ``triton_gemv._TABLE``; the candidates are compiled first in parallel
processes (``--jobs``) that fill Triton's on-disk cache. Prints a markdown table, writes JSON
(``--out``, default bench/results/gemv_<device>.json).

    python bench/gemv_bench.py [--out bench/results/gemv_h100.json] [--no-sweep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DTYPE = torch.bfloat16
# name, N, K, bias, silu (x is [M, 2K] gate | up)
SHAPES = [
    ("qkv_proj", 2048, 1536, True, False),
    ("o_proj", 1536, 1536, False, False),
    ("gate_up_proj", 17920, 1536, False, False),
    ("down_proj", 1536, 8960, False, False),
    ("down_proj+silu", 1536, 8960, False, True),
    ("lm_head", 151936, 1536, False, False),
]
WORKING_SET = 256 << 20  # bytes of rotated weight copies per shape (> L2)


def candidates(m: int, n: int, k: int) -> list[tuple]:
    """GemvConfig fields to sweep. CUDA-core kernel: >= one 16-byte load a thread per tile, at most
    64 fp32 accumulator registers a thread, >= 132 programs where N allows. Tensor-core kernel
    (M >= 2): block_n >= 16, at most 200 KB of pipeline buffers."""
    out: list[tuple] = []
    kmax = max(256, 1 << (k - 1).bit_length())
    for bn in (1, 2, 4, 8, 16, 32):
        for bk in (256, 512, 1024, 2048):
            for warps in (2, 4, 8) if n * k <= (4 << 20) else (4, 8):
                threads = 32 * warps
                if bk > kmax or bn * bk < 8 * threads or m * bn * bk > 64 * threads:
                    continue
                if math.ceil(n / bn) < 132 and bn > 1:
                    continue
                for stages in (1, 3) if m == 1 or warps > 2 else (3,):
                    out.append((bn, bk, warps, stages, False))
    if m >= 2:
        for bn in (16, 32, 64, 128):
            for bk in (64, 128, 256, 512):
                for stages in (3, 4, 6):
                    if bk <= kmax and stages * (bn + 16) * bk * 2 <= 200 << 10:
                        out.append((bn, bk, 4 if bn <= 64 else 8, stages, True))
    return out


def _compile_worker(jobs: list[tuple]) -> int:
    """Launches each (m, k, bias, silu, config) once on small tensors with the real launches'
    specialisation (M, K, 16-divisible N and strides), so Triton's disk cache holds them."""
    from kernels import triton_gemv as tg

    for m, k, bias, silu, cfg in jobs:
        n = 256
        x = torch.randn(m, 2 * k if silu else k, device="cuda", dtype=DTYPE)
        w = torch.randn(n, k, device="cuda", dtype=DTYPE)
        b = torch.randn(n, device="cuda", dtype=DTYPE) if bias else None
        (tg.gemv_silu_mul if silu else tg.gemv)(x, w, b, config=tg.GemvConfig(*cfg))
    torch.cuda.synchronize()
    return len(jobs)


def precompile(jobs: list[tuple], workers: int) -> None:
    jobs = sorted(set(jobs))
    if workers <= 1 or len(jobs) < 8:
        _compile_worker(jobs)
        return
    chunks = [jobs[i::workers] for i in range(workers)]
    t0 = time.time()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
        done = sum(ex.map(_compile_worker, chunks))
    print(f"precompiled {done} kernels in {time.time() - t0:.1f} s with {workers} processes", flush=True)


def time_graph(calls: list[Callable[[], object]], replays: int) -> float:
    """us per call: ``calls`` captured back to back in one CUDA graph, median of ``replays``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls[:2]:  # warm-up outside the capture (compiles, cuBLAS workspaces)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    for _ in range(2):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def _sweeps(name: str, m: int, fused_silu_max_m: int) -> bool:
    """Which (shape, M) get a config sweep: the fused activation only where fused_ops runs it,
    plain down_proj only where fused_ops runs the unfused pair (the table is shared)."""
    if name == "down_proj+silu":
        return m <= fused_silu_max_m
    if name == "down_proj":
        return m > fused_silu_max_m
    return True


def bench_shape(spec: tuple, ms: list[int], args: argparse.Namespace, sweep: bool) -> list[dict]:
    from kernels import fused_ops
    from kernels import triton_fused as tf
    from kernels import triton_gemv as tg

    name, n, k, has_bias, silu = spec
    wbytes = n * k * DTYPE.itemsize
    copies = max(1, min(args.calls, math.ceil(WORKING_SET / wbytes)))
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randn(n, k, device="cuda", dtype=DTYPE, generator=g) / math.sqrt(k) for _ in range(copies)]
    b = torch.randn(n, device="cuda", dtype=DTYPE, generator=g) if has_bias else None
    rows = []
    for m in ms:
        x = torch.randn(m, 2 * k if silu else k, device="cuda", dtype=DTYPE, generator=g)

        def calls(fn: Callable, count: int) -> list[Callable[[], object]]:
            return [lambda w=ws[i % copies]: fn(w) for i in range(count)]

        if silu:
            cublas = lambda w: F.linear(tf.silu_and_mul(x), w, b)  # noqa: E731
            gemv = lambda w, c=None: tg.gemv_silu_mul(x, w, b, config=c)  # noqa: E731
            ours = lambda w: fused_ops.silu_and_mul_linear(x, w, b)  # noqa: E731
        else:
            cublas = lambda w: F.linear(x, w, b)  # noqa: E731
            gemv = lambda w, c=None: tg.gemv(x, w, b, config=c)  # noqa: E731
            ours = lambda w: fused_ops.linear(x, w, b)  # noqa: E731
        path = "cuBLAS" if not tg.use_gemv(m, n, k) else "gemv_silu_mul" if silu and m <= tg.FUSED_SILU_MAX_M \
            else "silu_and_mul + gemv" if silu else "gemv"
        row = {"shape": name, "N": n, "K": k, "M": m, "bias": has_bias, "silu": silu, "weight_copies": copies,
               "config": list(tg.config_for(m, n, k)), "path": path}
        row["cublas_us"] = time_graph(calls(cublas, args.calls), args.replays)
        row["ours_us"] = time_graph(calls(ours, args.calls), args.replays)  # fused_ops' dispatch
        row["gemv_us"] = time_graph(calls(gemv, args.calls), args.replays)  # the GEMV, table config
        if silu:  # the unfused Triton pair, as fused_ops runs it above FUSED_SILU_MAX_M rows
            pair = lambda w: tg.gemv(tf.silu_and_mul(x), w, b)  # noqa: E731
            row["gemv_unfused_us"] = time_graph(calls(pair, args.calls), args.replays)
            ref = F.linear(tf.silu_and_mul(x), ws[0], b).float()
        else:
            ref = F.linear(x, ws[0], b).float()
        got = gemv(ws[0]).float()
        row["max_rel_err_vs_cublas"] = ((got - ref).abs().max() / ref.abs().max()).item()
        for key in ("cublas", "ours", "gemv", "gemv_unfused"):
            if f"{key}_us" in row:
                row[f"{key}_GBps"] = wbytes / (row[f"{key}_us"] * 1e-6) / 1e9
        row["speedup"] = row["cublas_us"] / row["ours_us"]
        if sweep and _sweeps(name, m, tg.FUSED_SILU_MAX_M):
            results = []
            n_calls = args.sweep_calls if wbytes < (100 << 20) else max(4, args.sweep_calls // 10)
            for cfg in candidates(m, n, k):
                c = tg.GemvConfig(*cfg)
                us = time_graph(calls(lambda w, c=c: gemv(w, c), n_calls), args.sweep_replays)
                results.append((us, cfg))
            results.sort()
            row["sweep"] = [{"config": list(c), "us": us} for us, c in results]
            if results:
                row["best_config"], row["best_us"] = list(results[0][1]), results[0][0]
        rows.append(row)
        print(f"{name:15s} M={m}: cuBLAS {row['cublas_us']:7.2f} us  ours {row['ours_us']:7.2f} us "
              f"({row['speedup']:.2f}x, {path})  gemv {row['gemv_us']:7.2f} us {tuple(row['config'])}"
              + (f"  best {row['best_us']:7.2f} us {tuple(row['best_config'])}" if row.get("best_config") else ""),
              flush=True)
    del ws
    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shape (N x K) | M | cuBLAS us | cuBLAS GB/s | ours us | ours GB/s | speedup | ours = | GEMV us "
             "(table config) | config (bn, bk, warps, stages, dot) | best swept us | best config |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        extra = f" (unfused pair {r['gemv_unfused_us']:.2f})" if "gemv_unfused_us" in r else ""
        best = f"{r['best_us']:.2f} | {tuple(r['best_config'])}" if r.get("best_config") else "- | -"
        lines.append(
            f"| {r['shape']} ({r['N']} x {r['K']}) | {r['M']} | {r['cublas_us']:.2f} | {r['cublas_GBps']:.0f} | "
            f"{r['ours_us']:.2f} | {r['ours_GBps']:.0f} | {r['speedup']:.2f}x | {r['path']} | {r['gemv_us']:.2f}{extra} | "
            f"{tuple(r['config'])} | {best} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--shapes", nargs="+", default=None, help="subset of shape names")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--sweep-calls", type=int, default=50)
    ap.add_argument("--sweep-replays", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemv_bench: needs a CUDA GPU (this machine has none); nothing to measure on CPU")
    from kernels import fused_ops
    from kernels import triton_gemv as tg

    fused_ops.set_enabled(True)
    shapes = [s for s in SHAPES if args.shapes is None or s[0] in args.shapes]
    jobs = []
    for name, n, k, bias, silu in shapes:
        for m in args.ms:
            swept = args.sweep and _sweeps(name, m, tg.FUSED_SILU_MAX_M)
            cfgs = {tuple(tg.config_for(m, n, k))} | (set(candidates(m, n, k)) if swept else set())
            # the tensor-core kernel takes M at run time: one compile serves every M >= 2
            jobs += [(2 if c[4] and m >= 2 else m, k, bias, silu, c) for c in cfgs]
            if silu:
                jobs.append((m, k, bias, False, tuple(tg.config_for(m, n, k))))
    precompile(jobs, args.jobs)

    dev = torch.cuda.get_device_name()
    out = Path(args.out or REPO_ROOT / "bench/results" / f"gemv_{'h100' if 'H100' in dev else dev.split()[-1].lower()}.json")
    result = {"device": dev, "torch": torch.__version__, "triton": __import__("triton").__version__,
              "dtype": "bfloat16", "calls": args.calls, "replays": args.replays, "working_set_bytes": WORKING_SET,
              "rows": []}
    for spec in shapes:
        result["rows"] += bench_shape(spec, args.ms, args, args.sweep)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))  # after every shape: partial results survive a timeout
    print(f"\n{dev}, bf16, us per call (CUDA graph of {args.calls} calls, median of {args.replays} replays)\n")
    print(table(result["rows"]))
    if args.sweep:
        print("\n# best swept configs: (N, K) -> {M: GemvConfig(block_n, block_k, num_warps, num_stages, dot)}")
        for r in result["rows"]:
            if r.get("best_config"):
                print(f"({r['N']}, {r['K']}, silu={r['silu']}) M={r['M']}: {tuple(r['best_config'])} "
                      f"{r['best_us']:.2f} us; next: "
                      + ", ".join(f"{tuple(s['config'])} {s['us']:.2f}" for s in r["sweep"][1:4]))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
