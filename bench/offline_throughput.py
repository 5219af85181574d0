"""Offline throughput: vlmserve's engine vs Hugging Face transformers ``generate``, on CPU.

Both run in this one process on the same locally built random-weight checkpoint (default: Qwen2,
4 layers, hidden 256, 8 heads / 2 KV heads, intermediate 704, float32) and the same prompts
(default: 32 prompts of 32-160 random token ids, 64 new tokens each, greedy). Every request
produces exactly the requested number of tokens on both sides, with EOS suppressed the same way:
``min_tokens=max_tokens`` for us, ``min_new_tokens=max_new_tokens`` for HF. (``ignore_eos=True``
would also give the full length, but it lets EOS be generated and continues, where HF masks
it, so greedy outputs would part at the first step where EOS is the argmax.)

* ``vlmserve engine``: all prompts in one ``LLM.generate`` call (continuous batching).
* ``HF generate, batch N``: all prompts in one left-padded batch.
* ``HF generate, batch 1``: a subset of the prompts one at a time (``--hf-seq-prompts``).

Each system is warmed up once on other prompts first. The timed runs repeat ``--repeats`` times,
each with a fresh prompt set (the same sets for every system, so prefix caching cannot help), and
the best time per system is reported (the machine may be shared; all times go to the JSON).
Prints a markdown table and writes JSON to bench/results/offline_throughput_cpu.json.

    python bench/offline_throughput.py [--num-prompts 32 --output-len 64 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from engine import LLM, SamplingParams  # noqa: E402
from runtime.demo_model import build_tiny_model  # noqa: E402

NUM_SPECIAL_TOKENS = 3  # ids 0..2 are the tokenizer's special tokens; prompts avoid them


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="qwen2", choices=["qwen2", "llama"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--min-prompt-len", type=int, default=32)
    p.add_argument("--max-prompt-len", type=int, default=160)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--hf-seq-prompts", type=int, default=8,
                   help="prompts run one at a time through HF generate (0: skip that row)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per system; the best is reported")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="use (or build into) this folder instead of a temporary one")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "offline_throughput_cpu.json")
    return p.parse_args(argv)


def random_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(NUM_SPECIAL_TOKENS, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_engine(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[float, list[list[int]], int]:
    params = SamplingParams(max_tokens=output_len, min_tokens=output_len, temperature=0.0)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    dt = time.perf_counter() - t0
    return dt, [list(o.outputs[0].token_ids) for o in outs], sum(o.num_cached_tokens for o in outs)


@torch.no_grad()
def run_hf(model, prompts: list[list[int]], output_len: int, batch_size: int, pad_id: int) -> tuple[float, list[list[int]]]:
    results: list[list[int]] = []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], dtype=torch.long)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], dtype=torch.long)
        out = model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len,
            pad_token_id=pad_id, temperature=None, top_p=None, top_k=None,
        )
        results.extend(out[:, width:].tolist())
    return time.perf_counter() - t0, results


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions where two greedy outputs agree, up to each pair's first divergence."""
    same = total = 0
    for x, y in zip(a, b):
        total += len(x)
        for s, t in zip(x, y):
            if s != t:
                break
            same += 1
    return same / total if total else 1.0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tmp = None
    if args.model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="vlmserve-bench-")
        model_dir = Path(tmp.name)
    else:
        model_dir = args.model_dir
    if not (model_dir / "config.json").exists():
        build_tiny_model(
            model_dir, args.arch, num_hidden_layers=args.layers, hidden_size=args.hidden,
            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            intermediate_size=args.intermediate, max_position_embeddings=2048, seed=args.seed,
        )
    config = json.loads((model_dir / "config.json").read_text())
    vocab = config["vocab_size"]
    prompt_sets = [
        random_prompts(args.num_prompts, args.min_prompt_len, args.max_prompt_len, vocab, args.seed + r)
        for r in range(args.repeats)
    ]
    prompts = prompt_sets[0]
    warm = random_prompts(2, args.min_prompt_len, args.max_prompt_len, vocab, args.seed + 1000)
    n_out = args.num_prompts * args.output_len
    rows = []

    def row(system: str, requests: int, times: list[float]) -> dict:
        return dict(system=system, requests=requests, output_tokens=requests * args.output_len,
                    seconds=min(times), all_seconds=times)

    # --- our engine -------------------------------------------------------------------------
    llm = LLM(model=str(model_dir), device="cpu", dtype="float32", seed=args.seed)
    run_engine(llm, warm, 8)
    times, cached = [], 0
    for r, ps in enumerate(prompt_sets):
        dt, out, hits = run_engine(llm, ps, args.output_len)
        assert sum(map(len, out)) == n_out, "the engine stopped before max_tokens"
        times.append(dt)
        cached += hits
        if r == 0:
            eng_out = out
    rows.append(row("vlmserve engine (one generate call)", len(prompts), times))
    del llm

    # --- HF transformers --------------------------------------------------------------------
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad_id = hf.generation_config.pad_token_id
    if pad_id is None:
        pad_id = 0
    run_hf(hf, warm, 8, len(warm), pad_id)
    times = []
    for r, ps in enumerate(prompt_sets):
        dt, out = run_hf(hf, ps, args.output_len, len(ps), pad_id)
        assert sum(map(len, out)) == n_out
        times.append(dt)
        if r == 0:
            hf_out = out
    hf_s = min(times)
    rows.append(row(f"HF generate, batch {len(prompts)} (left-padded)", len(prompts), times))
    seq_out = []
    if args.hf_seq_prompts > 0:
        times = []
        for r, ps in enumerate(prompt_sets):
            dt, out = run_hf(hf, ps[: args.hf_seq_prompts], args.output_len, 1, pad_id)
            times.append(dt)
            if r == 0:
                seq_out = out
        rows.append(row("HF generate, batch 1 (sequential)", len(seq_out), times))

    for r in rows:
        r["output_tok_per_s"] = r["output_tokens"] / r["seconds"]
        r["ratio_vs_hf_batched"] = r["output_tok_per_s"] / (n_out / hf_s)

    print(f"\nOffline throughput on CPU ({os.cpu_count()} cores, torch {torch.__version__}, "
          f"transformers {transformers.__version__}); {args.arch} {args.layers}L h{args.hidden} "
          f"{args.heads}/{args.kv_heads} heads, fp32; {args.num_prompts} prompts of "
          f"{args.min_prompt_len}-{args.max_prompt_len} tokens, {args.output_len} new tokens each\n")
    print(f"| system | requests | output tokens | seconds (best of {args.repeats}) | output tok/s | vs HF batched |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['system']} | {r['requests']} | {r['output_tokens']} | {r['seconds']:.2f} | "
              f"{r['output_tok_per_s']:.1f} | {r['ratio_vs_hf_batched']:.2f}x |")
    agree_batched = agreement(eng_out, hf_out)
    agree_seq = agreement(eng_out[: len(seq_out)], seq_out) if seq_out else None
    # The same comparison within HF (batched vs batch 1) calibrates what fp32 noise alone does.
    agree_hf = agreement(hf_out[: len(seq_out)], seq_out) if seq_out else None
    print("\ngreedy agreement (share of output positions before the first divergence): engine vs HF "
          f"batched {agree_batched:.3f}"
          + (f", engine vs HF batch 1 {agree_seq:.3f}, HF batched vs HF batch 1 {agree_hf:.3f}"
             if seq_out else "")
          + f"; engine prefix-cache hits: {cached} tokens; load average {os.getloadavg()[0]:.2f}")

    result = dict(
        benchmark="offline_throughput", device="cpu", cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__,
        python=platform.python_version(), machine=platform.machine(),
        config=dict(arch=args.arch, layers=args.layers, hidden=args.hidden, heads=args.heads,
                    kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=vocab, dtype="float32",
                    num_prompts=args.num_prompts, prompt_len=[args.min_prompt_len, args.max_prompt_len],
                    prompt_tokens=sum(map(len, prompts)), output_len=args.output_len,
                    hf_seq_prompts=args.hf_seq_prompts, repeats=args.repeats, seed=args.seed, greedy=True,
                    eos="suppressed until output_len (min_tokens / min_new_tokens)"),
        load_average_at_end=os.getloadavg(),
        results=rows,
        greedy_agreement=dict(engine_vs_hf_batched=agree_batched, engine_vs_hf_batch1=agree_seq,
                              hf_batched_vs_hf_batch1=agree_hf),
        engine_prefix_cache_hit_tokens=cached,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
