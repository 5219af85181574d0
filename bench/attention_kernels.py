"""Micro-benchmark: Triton paged attention (kernels/triton_attention.py) vs the torch reference
(kernels/torch_ref.py), on one CUDA GPU.

Shape: Qwen2-VL-2B's attention (12 query heads, 2 KV heads, head_dim 128), bf16, block size 16,
scattered block ids. Cases: decode batches of 1 / 64 / 256 sequences with 300-token contexts, and
two prefill shapes (one fresh 2048-token prompt; 8 chunks of 512 tokens over 1024 cached tokens);
also ``write_kv`` of 1 / 256 / 2048 new tokens, and decode batch 1 with split-K turned off.

Two timings per backend, microseconds per ``attend`` call, from CUDA events:
  * eager: ``--iters`` back-to-back calls between two events (includes Python/launch overhead,
    which dominates small decode batches);
  * graph: the same calls captured in one CUDA graph and replayed (GPU time alone); the torch
    reference's mixed path loops on the host, so it is graphed only for decode.
Each timing is the median of ``--repeats`` runs. Decode rows also give the KV bytes read per
second (keys + values of every context token, once). Prints a markdown table, writes JSON.

    python bench/attention_kernels.py [--out bench/results/attention_kernels_h100.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from kernels import AttentionMetadata
from kernels.torch_ref import TorchReferenceBackend
from kernels.triton_attention import TritonBackend

H, HKV, D, BS = 12, 2, 128, 16
DTYPE = torch.bfloat16


def make_batch(seqs: list[tuple[int, int]], seed: int = 0):
    """seqs: (seq_len, query_len) -> (query, kv_cache, metadata) with every context token written."""
    g = torch.Generator().manual_seed(seed)
    blocks = [math.ceil(ctx / BS) for ctx, _ in seqs]
    num_blocks = 1 + sum(blocks)
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables = torch.zeros(len(seqs), max(blocks), dtype=torch.int32)
    slots, qsl = [], [0]
    for i, ((ctx, ql), n) in enumerate(zip(seqs, blocks)):
        t, perm = perm[:n], perm[n:]
        tables[i, :n] = torch.tensor(t, dtype=torch.int32)
        slots += [t[p // BS] * BS + p % BS for p in range(ctx - ql, ctx)]
        qsl.append(qsl[-1] + ql)
    cache = torch.randn((2, num_blocks, BS, HKV, D), dtype=DTYPE, device="cuda")
    query = torch.randn(qsl[-1], H, D, dtype=DTYPE, device="cuda")
    ctxs = [c for c, _ in seqs]
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device="cuda"),
        block_tables=tables.cuda(),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(ctxs, dtype=torch.int32, device="cuda"),
        max_query_len=max(q for _, q in seqs),
        max_seq_len=max(ctxs),
        block_size=BS,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=ctxs,
    )
    return query, cache, md


def time_eager(fn, iters: int, repeats: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / iters)
    return statistics.median(times)


def time_graph(fn, iters: int, repeats: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / iters)
    del graph
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO_ROOT / "bench/results/attention_kernels_h100.json"))
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    triton_be, torch_be = TritonBackend(), TorchReferenceBackend()
    scale = D**-0.5
    cases = [
        ("decode", "batch 1, ctx 300", [(300, 1)]),
        ("decode", "batch 64, ctx 300", [(300, 1)] * 64),
        ("decode", "batch 256, ctx 300", [(300, 1)] * 256),
        ("prefill", "1 x 2048 fresh", [(2048, 2048)]),
        ("prefill", "8 x 512 over 1024 cached", [(1536, 512)] * 8),
    ]
    rows = []
    # write_kv: the new tokens of one step (1 decode token / 256 decode tokens / a 2048-token prompt)
    for ntok in (1, 256, 2048):
        seqs = [(300, 1)] * ntok if ntok <= 256 else [(ntok, ntok)]
        query, cache, md = make_batch(seqs)
        key = torch.randn(ntok, HKV, D, dtype=DTYPE, device="cuda")
        val = torch.randn(ntok, HKV, D, dtype=DTYPE, device="cuda")
        row = {"kind": "write_kv", "case": f"{ntok} tokens", "num_tokens": ntok}
        for name, be in (("triton", triton_be), ("torch", torch_be)):
            fn = lambda be=be, c=cache, m=md, k=key, v=val: be.write_kv(k, v, c, m.slot_mapping)
            row[f"{name}_eager_us"] = time_eager(fn, args.iters, args.repeats)
            row[f"{name}_graph_us"] = time_graph(fn, args.iters, args.repeats)
        row["speedup_eager"] = row["torch_eager_us"] / row["triton_eager_us"]
        rows.append(row)
    no_split = TritonBackend()
    no_split.MAX_SPLITS = 1
    query, cache, md = make_batch([(300, 1)])
    row = {"kind": "decode", "case": "batch 1, ctx 300, split-K off", "num_seqs": 1, "num_tokens": 1}
    fn = lambda: no_split.attend(query, cache, md, scale)
    row["triton_eager_us"] = time_eager(fn, args.iters, args.repeats)
    row["triton_graph_us"] = time_graph(fn, args.iters, args.repeats)
    row["kv_bytes"] = 300 * HKV * D * 2 * cache.element_size()
    row["triton_graph_GBps"] = row["kv_bytes"] / (row["triton_graph_us"] * 1e-6) / 1e9
    row["triton_decode_splits"] = 1
    extra_rows = [row]

    for kind, label, seqs in cases:
        query, cache, md = make_batch(seqs)
        out_tr = triton_be.attend(query, cache, md, scale)
        out_ref = torch_be.attend(query, cache, md, scale)
        max_diff = (out_tr.float() - out_ref.float()).abs().max().item()
        row = {"kind": kind, "case": label, "num_seqs": len(seqs), "num_tokens": query.shape[0],
               "max_abs_diff_vs_torch": max_diff}
        for name, be in (("triton", triton_be), ("torch", torch_be)):
            fn = lambda be=be, q=query, c=cache, m=md: be.attend(q, c, m, scale)
            iters = args.iters if kind == "decode" else max(5, args.iters // 10)
            row[f"{name}_eager_us"] = time_eager(fn, iters, args.repeats)
            graphable = name == "triton" or kind == "decode"
            try:
                row[f"{name}_graph_us"] = time_graph(fn, iters, args.repeats) if graphable else None
            except Exception as exc:  # noqa: BLE001 - a reference that cannot be captured is reported, not fatal
                print(f"{name} {label}: CUDA graph capture failed: {exc!r}", flush=True)
                torch.cuda.synchronize()
                row[f"{name}_graph_us"] = None
        if kind == "decode":
            kv_bytes = sum(c for c, _ in seqs) * HKV * D * 2 * cache.element_size()
            row["kv_bytes"] = kv_bytes
            row["triton_graph_GBps"] = kv_bytes / (row["triton_graph_us"] * 1e-6) / 1e9
            row["triton_decode_splits"] = triton_be.num_decode_splits(len(seqs), HKV, md.max_seq_len, query.device)[0]
        else:
            # causal attention FLOPs: 4 * H * D per (query, visible key) pair
            pairs = sum(sum(ctx - ql + j + 1 for j in range(ql)) for ctx, ql in seqs)
            row["triton_graph_TFLOPs"] = 4 * H * D * pairs / (row["triton_graph_us"] * 1e-6) / 1e12
        row["speedup_eager"] = row["torch_eager_us"] / row["triton_eager_us"]
        rows.append(row)
        print(f"done: {label}", flush=True)
    rows += extra_rows

    dev = torch.cuda.get_device_name()
    import triton

    print(f"\nattend, {dev}, torch {torch.__version__}, triton {triton.__version__}; "
          f"{H} q heads / {HKV} kv heads, head_dim {D}, bf16, block size {BS}; us per call (median of {args.repeats})\n")
    print("| case | triton eager | triton graph | torch eager | torch graph | speedup (eager) | note |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    def fmt(x):
        return f"{x:.1f}" if x is not None else "n/a"

    for r in rows:
        if r["kind"] == "decode":
            note = f"{r['triton_graph_GBps']:.0f} GB/s KV read (graph), {r['triton_decode_splits']} splits"
        elif r["kind"] == "prefill":
            note = f"{r['triton_graph_TFLOPs']:.0f} TFLOP/s (graph)"
        else:
            note = ""
        speedup = f"{r['speedup_eager']:.1f}x" if "speedup_eager" in r else "n/a"
        print(f"| {r['kind']} {r['case']} | {fmt(r['triton_eager_us'])} | {fmt(r['triton_graph_us'])} | "
              f"{fmt(r.get('torch_eager_us'))} | {fmt(r.get('torch_graph_us'))} | {speedup} | {note} |")
    result = {
        "device": dev, "torch": torch.__version__, "triton": triton.__version__,
        "shape": {"num_heads": H, "num_kv_heads": HKV, "head_dim": D, "dtype": "bfloat16", "block_size": BS},
        "iters": args.iters, "repeats": args.repeats, "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
