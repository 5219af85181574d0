"""Launch-shape sweep of the Triton decode attention (kernels/triton_attention.py) on one CUDA GPU.

W1's decode steps run 512 sequences of 298-426 tokens through ``_decode_kernel``; batch-1 decode
runs one sequence under a graph whose grid is sized for max_model_len. This times the kernel for
each (keys per tile, warps, pipeline stages) on those batches (Qwen2-VL-2B's attention: 12 query
heads, 2 KV heads, head_dim 128, bf16, 16-token blocks, scattered block ids), as a CUDA graph of
``--iters`` calls (GPU time alone), and reports microseconds per call and the KV bytes read per
second. The default configuration is the first row of each batch.

    PYTHONPATH=. python3 bench/decode_attention_sweep.py [--splits 2,3,4] [--out $OUT/decode_sweep.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.attention_kernels import BS, D, HKV, make_batch, time_graph  # noqa: E402
from kernels.triton_attention import TritonBackend  # noqa: E402


def batches() -> dict[str, tuple[list[tuple[int, int]], int | None]]:
    rng = random.Random(0)
    return {
        "W1 decode, 512 seqs x 298-426 tokens": ([(rng.randint(298, 426), 1) for _ in range(512)], None),
        "256 seqs x 298-426 tokens": ([(rng.randint(298, 426), 1) for _ in range(256)], None),
        "64 seqs x 300-1500 tokens": ([(rng.randint(300, 1500), 1) for _ in range(64)], None),
        "batch 1, 554 tokens, grid for 32768": ([(554, 1)], 32768),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--splits", default="", metavar="N,...",
                    help="also force these split-K counts on the first (W1) batch, beside the heuristic's")
    args = ap.parse_args()
    forced = [int(x) for x in args.splits.split(",") if x]
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    default = (TritonBackend.DECODE_BLOCK_N, TritonBackend.DECODE_WARPS, TritonBackend.DECODE_STAGES)
    configs = [default] + [c for c in itertools.product((32, 64, 128), (4, 8), (2, 3, 4)) if c != default]
    results = {}
    for b_index, (name, (seqs, grid_len)) in enumerate(batches().items()):
        query, cache, md = make_batch(seqs)
        if grid_len is not None:
            md.max_seq_len = grid_len
        kv_bytes = sum(ctx for ctx, _ in seqs) * 2 * HKV * D * cache.element_size()
        rows = []
        for (bn, warps, stages), split in itertools.product(configs, [None] + (forced if b_index == 0 else [])):
            be = TritonBackend()
            be.DECODE_BLOCK_N, be.DECODE_WARPS, be.DECODE_STAGES = bn, warps, stages
            if split is not None:
                be.num_decode_splits = lambda *a, _s=split, **k: _s
            chosen = be.num_decode_splits(md.num_seqs, HKV, md.max_seq_len, query.device, bn)
            try:
                us = time_graph(lambda: be.attend(query, cache, md, 0.088), args.iters, args.repeats)  # noqa: B023
            except Exception as exc:  # noqa: BLE001 - a config that does not compile (shared memory)
                rows.append(dict(block_n=bn, warps=warps, stages=stages, splits=chosen, error=str(exc)[:120]))
                continue
            rows.append(dict(block_n=bn, warps=warps, stages=stages, splits=chosen, us=us, GBps=kv_bytes / us / 1e3))
        ok = [r for r in rows if "us" in r]
        best = min(ok, key=lambda r: r["us"])
        results[name] = dict(kv_bytes=kv_bytes, default=rows[0], best=best, all=rows)
        print(f"{name}: default {rows[0].get('us', float('nan')):.1f} us ({rows[0].get('GBps', 0):.0f} GB/s); "
              f"best {best['us']:.1f} us ({best['GBps']:.0f} GB/s) at BLOCK_N={best['block_n']} "
              f"warps={best['warps']} stages={best['stages']}", flush=True)
        for r in sorted(ok, key=lambda r: r["us"])[:6]:
            print(f"    {r['us']:8.1f} us {r['GBps']:7.0f} GB/s  BLOCK_N={r['block_n']} warps={r['warps']} "
                  f"stages={r['stages']} splits={r['splits']}")
    card = torch.cuda.get_device_name(0).split()[1].lower() if len(torch.cuda.get_device_name(0).split()) > 1 else "gpu"
    out = Path(args.out) if args.out else REPO_ROOT / f"bench/results/decode_attention_sweep_{card}.json"
    out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(0), block_size=BS, results=results), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
