"""Where a W1 run's wall time goes on the GPU machine: torch.profiler over a whole W1 run (after a
warm one), reporting per step kind the device-busy fraction and the host calls that block on the
device (synchronising copies, event / stream waits) with their total time.

    PYTHONPATH=. python3 bench/profile_w1.py [--max-num-seqs 512 --max-num-batched-tokens 16384]

Prints a summary and writes JSON to $OUT/profile_w1.json (or bench/results/profile_w1.json).
A diagnostic: the throughput figure of record is bench/gpu_throughput.py's (the profiler slows
the host).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.gpu_throughput import Inputs, greedy_params, w1_llm

BLOCKING = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy ",
            "cudaMemcpy", "aten::_local_scalar_dense", "aten::item", "cudaHostAlloc", "cudaMalloc")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    args = p.parse_args()
    llm = w1_llm(args.max_num_seqs, args.max_num_batched_tokens)
    inputs = Inputs(448, 42)
    llm.generate(inputs.requests(5_000_000, args.num_requests), greedy_params(args.output_len), use_tqdm=False)
    reqs = inputs.requests(6_000_000, args.num_requests)
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        llm.generate(reqs, greedy_params(args.output_len), use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernel_ms = 0.0
    blocking: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    host_top: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernel_ms += float(getattr(e, "device_time", 0.0) or 0.0) / 1e3
            continue
        dur = (e.time_range.end - e.time_range.start) / 1e3  # us -> ms
        if any(e.name.startswith(b) for b in BLOCKING):
            blocking[e.name][0] += dur
            blocking[e.name][1] += 1
        host_top[e.name][0] += float(getattr(e, "self_cpu_time_total", 0.0) or 0.0) / 1e3
        host_top[e.name][1] += 1
    result = dict(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        wall_s=wall, kernel_s=kernel_ms / 1e3, device_busy_fraction=kernel_ms / 1e3 / wall,
        blocking_host_calls={k: {"ms": v[0], "calls": v[1]} for k, v in sorted(blocking.items(), key=lambda kv: -kv[1][0])},
        host_self_time_top={k: {"ms": v[0], "calls": v[1]} for k, v in
                            sorted(host_top.items(), key=lambda kv: -kv[1][0])[:30]},
        note="kernel_s sums kernel times (overlapping streams would double count; the engine uses one stream)",
    )
    out = Path(os.environ["OUT"]) / "profile_w1.json" if os.environ.get("OUT") else Path("bench/results/profile_w1.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "host_self_time_top"}, indent=1)[:4000])
    for k, v in list(result["host_self_time_top"].items())[:20]:
        print(f"{v['ms']:9.1f} ms {v['calls']:7d}  {k[:90]}")


if __name__ == "__main__":
    main()
