"""Where a W1 run's wall time goes on the GPU machine: torch.profiler over a whole W1 run (after a
warm one), reporting the device-busy fraction, the kernels that take the device time, and the host calls that block on the
device (synchronising copies, event / stream waits) with their total time.

    PYTHONPATH=. python3 bench/profile_w1.py [--max-num-seqs 512 --max-num-batched-tokens 16384]

Prints a summary and writes JSON to $OUT/profile_w1.json (or bench/results/profile_w1.json).
A diagnostic: the throughput figure of record is bench/gpu_throughput.py's (the profiler slows
the host).
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.gpu_throughput import Inputs, greedy_params, w1_llm
from engine import LLM

BLOCKING = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy ",
            "cudaMemcpy", "aten::_local_scalar_dense", "aten::item", "cudaHostAlloc", "cudaMalloc")


# (object path from the LLM, method, phase name): wrapped in record_function while profiled, so that
# every device gap can be charged to the phase the host was in.
PHASES = (
    ("core", "step", "core.step"),
    ("core.runner", "launch", "launch"),
    ("core.runner", "collect", "collect"),
    ("core.runner", "prepare", "launch/prepare inputs"),
    ("core.runner.mm_preprocessor", "prepare", "launch/image upload + packing"),
    ("core.runner.mm_preprocessor", "_upload", "launch/image upload"),
    ("core.runner.model", "_run_visual", "launch/vision tower"),
    ("core.runner.model", "forward", "launch/LM forward"),
    ("core.runner.model", "compute_logits", "launch/logits"),
    ("core.runner.sampler", "sample", "launch/sampler"),
    ("core", "_process", "core._process"),
    ("output_processor", "process", "output_processor.process"),
    ("processor", "process", "front end: process prompt"),
    ("core", "add_request", "front end: add request"),
)

PHASE_NAMES = frozenset(name for _, _, name in PHASES)


def annotate_phases(llm: LLM):
    """Wrap the PHASES methods of this engine in record_function; returns the undo."""
    from functools import reduce

    wrapped = []
    for path, attr, name in PHASES:
        obj = reduce(getattr, path.split("."), llm)
        orig = getattr(obj, attr, None)
        if orig is None:
            continue

        def f(*a, _orig=orig, _name=name, **k):
            with torch.profiler.record_function(_name):
                return _orig(*a, **k)

        setattr(obj, attr, f)
        wrapped.append((obj, attr))

    def undo() -> None:
        for obj, attr in wrapped:
            delattr(obj, attr)

    return undo


def device_gaps(trace: dict, min_gap_us: float = 20.0) -> dict:
    """Idle stretches of the device between its kernels / copies, and what the host's busiest
    thread was inside meanwhile: each idle microsecond is charged to the innermost annotated phase
    (PHASES) and to the innermost aten op / CUDA runtime call that covered it on the host."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    device = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
                    if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not device:
        return {"idle_ms": 0.0, "gaps": 0, "min_gap_us": min_gap_us, "host_phase_during_idle_ms": {},
                "host_op_during_idle_ms": {}}
    runtime_tids: dict = defaultdict(int)
    for e in events:
        if e.get("cat") == "cuda_runtime":
            runtime_tids[(e.get("pid"), e.get("tid"))] += 1
    main_tid = max(runtime_tids, key=runtime_tids.get) if runtime_tids else None
    # host events of that thread as (start, end, is a phase, name), microseconds
    host = [(float(e["ts"]), float(e["ts"]) + float(e["dur"]), e.get("cat") == "user_annotation", e["name"])
            for e in events if (e.get("pid"), e.get("tid")) == main_tid
            and e.get("cat") in ("user_annotation", "cpu_op", "cuda_runtime")]
    gaps, end = [], device[0][1]
    for start, stop in device[1:]:
        if start - end >= min_gap_us:
            gaps.append((end, start))
        end = max(end, stop)
    # charge each gap's microseconds to the innermost covering host event of each kind, by
    # sweeping the gap against the host intervals that overlap it
    # long host events (phases, blocking calls) are few: always checked; short ones by bisect
    long_host = [e for e in host if e[1] - e[0] > 1000.0]
    host = sorted(e for e in host if e[1] - e[0] <= 1000.0)
    starts = [e[0] for e in host]
    by_phase: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    largest = []
    for a, b in gaps:
        charged: dict[str, float] = defaultdict(float)
        lo = bisect.bisect_left(starts, a - 1000.0)
        hi = bisect.bisect_right(starts, b)
        cover = [e for e in (*host[lo:hi], *long_host) if e[0] < b and e[1] > a]
        cuts = sorted({a, b, *[min(max(t, a), b) for e in cover for t in e[:2]]})
        for x, y in itertools.pairwise(cuts):
            mid = (x + y) / 2
            inside = [e for e in cover if e[0] <= mid < e[1]]
            # innermost: the latest-starting covering event of each kind
            phase = max((e for e in inside if e[2]), default=(0, 0, True, "(no phase)"))[3]
            op = max((e for e in inside if not e[2]), default=(0, 0, False, "(python)"))[3]
            by_phase[phase] += (y - x) / 1e3
            by_op[f"{phase} | {op}"] += (y - x) / 1e3
            charged[f"{phase} | {op}"] += (y - x) / 1e3
        if charged:
            largest.append((round((b - a) / 1e3, 2), round((a - device[0][0]) / 1e3, 1), max(charged, key=charged.get)))
    top = lambda d: {k: round(v, 2) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:40]}
    return {"idle_ms": round(sum(b - a for a, b in gaps) / 1e3, 2), "gaps": len(gaps), "min_gap_us": min_gap_us,
            "device_span_ms": round((device[-1][1] - device[0][0]) / 1e3, 2),
            "host_phase_during_idle_ms": top(by_phase), "host_op_during_idle_ms": top(by_op),
            "largest_gaps_ms_at_ms_mostly": sorted(largest, reverse=True)[:20]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (checks the script)")
    args = p.parse_args()
    llm = w1_llm(args.max_num_seqs, args.max_num_batched_tokens, tiny=args.tiny)
    inputs = Inputs(448, 42)
    llm.generate(inputs.requests(5_000_000, args.num_requests), greedy_params(args.output_len), use_tqdm=False)
    reqs = inputs.requests(6_000_000, args.num_requests)
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    unwrap = annotate_phases(llm)
    try:
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            llm.generate(reqs, greedy_params(args.output_len), use_tqdm=False)
            sync()
            wall = time.perf_counter() - t0
    finally:
        unwrap()
    trace = Path(tempfile.mkdtemp()) / "w1_trace.json"
    prof.export_chrome_trace(str(trace))
    gaps = device_gaps(json.loads(trace.read_text()))
    kernel_ms = 0.0
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    blocking: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    host_top: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            if e.name in PHASE_NAMES:  # a record_function range mirrored on the device timeline
                continue
            ms = float(getattr(e, "device_time", 0.0) or 0.0) / 1e3
            kernel_ms += ms
            kernels[e.name][0] += ms
            kernels[e.name][1] += 1
            continue
        dur = (e.time_range.end - e.time_range.start) / 1e3  # us -> ms
        if any(e.name.startswith(b) for b in BLOCKING):
            blocking[e.name][0] += dur
            blocking[e.name][1] += 1
        host_top[e.name][0] += float(getattr(e, "self_cpu_time_total", 0.0) or 0.0) / 1e3
        host_top[e.name][1] += 1
    result = {
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "wall_s": wall, "kernel_s": kernel_ms / 1e3, "device_busy_fraction": kernel_ms / 1e3 / wall,
        "blocking_host_calls": {k: {"ms": v[0], "calls": v[1]} for k, v in sorted(blocking.items(), key=lambda kv: -kv[1][0])},
        "host_self_time_top": {k: {"ms": v[0], "calls": v[1]} for k, v in
                            sorted(host_top.items(), key=lambda kv: -kv[1][0])[:30]},
        "device_gaps": gaps,
        "kernels_top": {k[:160]: {"ms": v[0], "calls": v[1]} for k, v in
                     sorted(kernels.items(), key=lambda kv: -kv[1][0])[:60]},
        "note": "kernel_s sums kernel times (overlapping streams would double count; the engine uses one stream)",
    }
    out = Path(os.environ["OUT"]) / "profile_w1.json" if os.environ.get("OUT") else Path("bench/results/profile_w1.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("host_self_time_top", "kernels_top")},
                     indent=1)[:4000])
    print(f"device idle between its kernels: {gaps['idle_ms']:.1f} ms in {gaps['gaps']} gaps >= "
          f"{gaps['min_gap_us']} us; what the host was doing meanwhile (innermost phase, ms):")
    for k, v in list(gaps["host_phase_during_idle_ms"].items())[:15]:
        print(f"{v:9.1f} ms  {k}")
    for k, v in list(gaps["host_op_during_idle_ms"].items())[:15]:
        print(f"{v:9.1f} ms  op {k}")
    for g in gaps.get("largest_gaps_ms_at_ms_mostly", [])[:12]:
        print(f"gap {g[0]:7.2f} ms at {g[1]:8.1f} ms: {g[2]}")
    print("top kernels (device ms, calls):")
    for k, v in list(result["kernels_top"].items())[:40]:
        print(f"{v['ms']:9.1f} ms {v['calls']:7d}  {k[:110]}")
    for k, v in list(result["host_self_time_top"].items())[:20]:
        print(f"{v['ms']:9.1f} ms {v['calls']:7d}  {k[:90]}")


if __name__ == "__main__":
    main()
