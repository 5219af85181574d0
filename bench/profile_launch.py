"""Where the host's time goes in the engine's step launches during W1: cProfile around every
``runner.launch`` (prefill-carrying and decode-only steps profiled separately) and around the
offline feeder, after a warm W1 run.

    PYTHONPATH=. python3 bench/profile_launch.py [--max-num-seqs 512 --max-num-batched-tokens 16384]

A diagnostic for a host-bound step (bench/gpu_throughput.py's device trace shows one: a step's
device time exceeding its kernels' sum); cProfile slows Python code, so read shares, not seconds.
Prints the top functions by own time and writes them to $OUT/profile_launch.txt.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from pathlib import Path

import torch

from bench.gpu_throughput import Inputs, greedy_params, w1_llm
from engine import LLM


def phase_events(llm: LLM, inputs: Inputs, args: argparse.Namespace) -> str:
    """Another W1 run (no cProfile) with CUDA events around each phase of a launch. A phase's
    device time is the span between its entry and exit events on the stream: for a phase that
    queues little device work (prepare, the sampler's host side) that span is the time the device
    sat idle waiting for the host to finish it; for the compute phases it is their kernels plus
    any idle inside them."""
    from collections import defaultdict

    runner = llm.core.runner
    model = runner.model
    records: list[tuple[str, str, object, object]] = []  # (step kind, phase, start, end)
    state = {"kind": "prefill"}
    wrapped = []

    def wrap(obj, attr, phase):
        orig = getattr(obj, attr)

        def f(*a, **k):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t = time.perf_counter()
            s.record()
            r = orig(*a, **k)
            e.record()
            records.append((state["kind"], phase, s, e, time.perf_counter() - t))
            return r

        setattr(obj, attr, f)
        wrapped.append((obj, attr))

    orig_launch = runner.launch

    def launch(sched_out, *a, **k):
        state["kind"] = "decode" if sched_out.num_batched_tokens == len(sched_out.scheduled) else "prefill"
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        s.record()
        r = orig_launch(sched_out, *a, **k)
        e.record()
        records.append((state["kind"], "whole launch", s, e, time.perf_counter() - t))
        return r

    wrap(runner, "prepare", "prepare (host inputs, H2D)")
    wrap(runner.mm_preprocessor, "prepare", "image upload + pixel packing")
    if hasattr(runner.mm_preprocessor, "_upload"):
        wrap(runner.mm_preprocessor, "_upload", "  of which: upload")
    if getattr(model, "visual_runner", None) is not None:
        wrap(model, "_run_visual", "vision tower")
    wrap(model, "forward", "LM forward (eager)")
    if runner.cuda_graphs is not None:
        wrap(runner.cuda_graphs, "run", "LM forward (decode graph)")
    wrap(model, "compute_logits", "logits")
    wrap(runner.sampler, "sample", "sampler")
    runner.launch = launch
    try:
        llm.generate(inputs.requests(7_000_000, args.num_requests), greedy_params(args.output_len), use_tqdm=False)
    finally:
        for obj, attr in wrapped:
            delattr(obj, attr)
        del runner.launch
    torch.cuda.synchronize()
    total: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0, 0.0])
    for kind, phase, s, e, host in records:
        total[(kind, phase)][0] += s.elapsed_time(e)
        total[(kind, phase)][1] += 1
        total[(kind, phase)][2] += 1e3 * host
    lines = ["\n===== device ms between each phase's entry and exit events, and host ms in it (W1, no cProfile) ====="]
    for (kind, phase), (ms, n, host) in sorted(total.items()):
        lines.append(f"{kind:8s} {phase:32s} device {ms:8.1f} ms  host {host:8.1f} ms  {n:5d} calls  "
                     f"device {ms / n:7.2f} ms/call  host {host / n:7.2f} ms/call")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (checks the script)")
    args = p.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    llm = w1_llm(args.max_num_seqs, args.max_num_batched_tokens, args.tiny)
    inputs = Inputs(448, 42)
    llm.generate(inputs.requests(5_000_000, args.num_requests), greedy_params(args.output_len), use_tqdm=False)

    runner = llm.core.runner
    orig_launch = runner.launch
    profs = {"prefill": cProfile.Profile(), "decode": cProfile.Profile()}
    host = {"prefill": 0.0, "decode": 0.0}
    counts = {"prefill": 0, "decode": 0}

    def launch(sched_out, *a, **k):
        kind = "decode" if sched_out.num_batched_tokens == len(sched_out.scheduled) else "prefill"
        t = time.perf_counter()
        profs[kind].enable()
        try:
            return orig_launch(sched_out, *a, **k)
        finally:
            profs[kind].disable()
            host[kind] += time.perf_counter() - t
            counts[kind] += 1

    runner.launch = launch
    t0 = time.perf_counter()
    llm.generate(inputs.requests(6_000_000, args.num_requests), greedy_params(args.output_len), use_tqdm=False)
    wall = time.perf_counter() - t0
    del runner.launch
    buf = io.StringIO()
    buf.write(f"W1 under cProfile (launches only): {wall:.2f} s; host seconds in launch {host}, launches {counts}\n")
    if device.type == "cuda":
        buf.write(phase_events(llm, inputs, args))
    for kind, prof in profs.items():
        for key in ("tottime", "cumulative"):
            buf.write(f"\n===== {kind} launches, by {key} =====\n")
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(35)
    text = buf.getvalue()
    out = Path(os.environ["OUT"]) / "profile_launch.txt" if os.environ.get("OUT") else Path("/tmp/profile_launch.txt")
    out.write_text(text)
    print(text[:60000])


if __name__ == "__main__":
    main()
