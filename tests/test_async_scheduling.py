"""Async scheduling (engine/engine_core.py, Scheduler.schedule_next): a decode step's successor is
launched before the step's tokens reach the host. Outputs must not change: greedy equals HF
transformers and the synchronous engine, seeded sampling equals the synchronous engine, EOS /
max_tokens / min_tokens / stop strings / aborts end requests at the same token, and every KV block
comes back. Each test also checks that chained steps really ran (else it would prove nothing).
"""

from __future__ import annotations

import pytest
import tiny_models
from test_hf_equality import assert_all_blocks_returned

from engine import LLM, SamplingParams

PROMPTS = [
    "Hello there",
    "The quick brown fox jumps over the lazy dog " * 3,
    "a b c d e f g",
    "Numbers: 1 2 3 4 5",
    "once upon a time",
]


def _llm(model_dir, async_scheduling: bool, **kw) -> LLM:
    return LLM(str(model_dir), dtype="float32", max_model_len=256, async_scheduling=async_scheduling, **kw)


def _count_chained(llm: LLM) -> list[int]:
    """Counter of steps launched chained to an in-flight one (prev given)."""
    runner = llm.core.runner
    orig = runner.launch
    count = [0]

    def launch(sched_out, prev=None):
        count[0] += prev is not None
        return orig(sched_out, prev)

    runner.launch = launch
    return count


def _ids(llm: LLM) -> list[list[int]]:
    tok = llm.get_tokenizer()
    return [tok(p).input_ids for p in PROMPTS]


def test_greedy_equals_hf_and_sync_with_eos_and_mixed_lengths(tiny_llama_gqa):
    """tiny_llama_gqa stops on a frequent ordinary token as a second EOS: requests end mid-batch
    while a chained step for them is in flight."""
    llm = _llm(tiny_llama_gqa, True)
    chained = _count_chained(llm)
    ids = _ids(llm)
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (24, 5, 17, 1, 30)]
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    assert chained[0] > 0
    for o, p, ref in zip(outs, params, (tiny_models.hf_greedy(tiny_llama_gqa, [i], p.max_tokens)[0]
                                        for i, p in zip(ids, params))):
        assert o.outputs[0].token_ids == ref
    sync = _llm(tiny_llama_gqa, False)
    sync_chained = _count_chained(sync)
    sync_outs = sync.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    assert sync_chained[0] == 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in sync_outs]
    assert [o.outputs[0].finish_reason for o in outs] == [o.outputs[0].finish_reason for o in sync_outs]
    assert_all_blocks_returned(llm)


def test_seeded_sampling_min_tokens_and_stop_strings_match_sync(tiny_qwen2):
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=20),
        SamplingParams(temperature=1.0, seed=11, max_tokens=20, min_tokens=20),
        SamplingParams(temperature=0, max_tokens=40, min_tokens=12),
        SamplingParams(temperature=0, max_tokens=40, stop=[" the", "e"]),
        SamplingParams(temperature=0.7, top_k=5, seed=3, max_tokens=33, n=2),
    ]
    results = []
    for async_on in (True, False):
        llm = _llm(tiny_qwen2, async_on, block_size=16)
        chained = _count_chained(llm)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        assert (chained[0] > 0) == async_on
        assert_all_blocks_returned(llm)
        results.append([[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs])
    assert results[0] == results[1]
    assert len(results[0][1][0][0]) == 20  # min_tokens = max_tokens: no early EOS


def test_prefix_cache_hits_after_async_decode(tiny_qwen2):
    """Blocks completed by a token that was still pending when they were allocated are hashed once
    the token arrives: a second request repeating prompt + output hits them."""
    llm = _llm(tiny_qwen2, True, block_size=16, enable_prefix_caching=True)
    chained = _count_chained(llm)
    first = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0]
    assert chained[0] > 0
    full = first.prompt_token_ids + first.outputs[0].token_ids
    again = llm.generate([{"prompt_token_ids": full}], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    # every full block of the first request's prompt + output except the one holding the last
    # token (always recomputed) is found in the cache
    assert again.num_cached_tokens == (len(full) - 1) // 16 * 16
    ref = tiny_models.hf_greedy(tiny_qwen2, [full], 4)[0]
    assert again.outputs[0].token_ids == ref
    assert_all_blocks_returned(llm)


@pytest.mark.parametrize("workers", [0, 2])
def test_prompts_fed_while_the_engine_runs(tiny_qwen2, workers):
    """LLM.generate queues prompts past the first FIRST_FEED while the engine steps (processed on
    this thread, or by ``workers`` threads ahead of the engine): results keep the prompts' order
    and equal HF; a bad prompt far down the list still raises and leaves nothing queued, and the
    engine serves the next call."""
    import threading

    llm = _llm(tiny_qwen2, True, max_num_seqs=8)
    llm.FIRST_FEED = 4
    llm.preprocess_workers = workers
    fed_during_steps = [0]
    threads: set[str] = set()
    orig_process, orig_add = llm.processor.process, llm.core.add_request

    def process(*args):
        threads.add(threading.current_thread().name)
        return orig_process(*args)

    def add_request(req):
        # a prompt queued while a launched step is being computed (between launch and collect)
        fed_during_steps[0] += llm.core.runner.steps_in_flight > 0
        return orig_add(req)

    llm.processor.process = process
    llm.core.add_request = add_request
    orig_launch, orig_collect = llm.core.runner.launch, llm.core.runner.collect
    llm.core.runner.steps_in_flight = 0

    def launch(*a, **k):
        llm.core.runner.steps_in_flight += 1
        return orig_launch(*a, **k)

    def collect(h):
        llm.core.runner.steps_in_flight -= 1
        return orig_collect(h)

    llm.core.runner.launch, llm.core.runner.collect = launch, collect
    tok = llm.get_tokenizer()
    texts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(19)]
    ids = [tok(t).input_ids for t in texts]
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], SamplingParams(temperature=0, max_tokens=6),
                        use_tqdm=False)
    assert fed_during_steps[0] > 0
    main = threading.current_thread().name
    assert threads == ({main} if workers == 0 else {t for t in threads if t.startswith("vlmserve-feed")}), threads
    assert [o.prompt_token_ids for o in outs] == ids
    assert [o.outputs[0].token_ids for o in outs] == tiny_models.hf_greedy(tiny_qwen2, ids, 6)
    assert_all_blocks_returned(llm)

    bad = [{"prompt_token_ids": p} for p in ids[:15]] + [{"prompt_token_ids": [1, 10**6]}]
    try:
        llm.generate(bad, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    except ValueError as exc:
        assert "vocabulary" in str(exc)
    else:
        raise AssertionError("a bad prompt must raise")
    assert_all_blocks_returned(llm)
    assert not llm.output_processor.requests
    again = llm.generate([{"prompt_token_ids": ids[0]}], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert again[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_deferred_detokenisation_equals_incremental(tiny_qwen2, tiny_llama):
    """A final-only request without stop strings decodes its text once at the end; that text
    equals the incremental (DecodeStream) text, with and without special tokens skipped, on
    random token sequences including special tokens and byte-fallback pieces."""
    import random

    from engine.output_processor import IncrementalDetokenizer

    for model_dir in (tiny_qwen2, tiny_llama):
        tok = _llm(model_dir, False).get_tokenizer()
        rng = random.Random(0)
        specials = list(tok.all_special_ids)
        for trial in range(60):
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
            if trial % 3 == 0 and specials:
                ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
            for skip in (True, False):
                inc, dfr = IncrementalDetokenizer(tok, skip), IncrementalDetokenizer(tok, skip, deferred=True)
                for t in ids:
                    inc.add(t)
                    assert dfr.add(t) == ""
                inc.flush()
                dfr.flush()
                assert dfr.text == inc.text, (ids, skip)


def test_final_only_requests_report_once(tiny_qwen2):
    """Offline generate without stop strings or logprobs: the core reports each request once, at
    its end, with every token; the outputs equal those of requests reported token by token (a
    stop string that never matches forces the per-token path)."""
    llm = _llm(tiny_qwen2, True)
    reports: list[int] = []
    orig_step = llm.core.step

    def step(idle=None):
        out = orig_step(idle)
        reports.extend(len(o.new_token_ids) for o in out)
        return out

    llm.core.step = step
    quiet = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert sorted(reports) == sorted(len(o.outputs[0].token_ids) for o in quiet)  # one report each
    reports.clear()
    loud = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, stop=["\x00never"]), use_tqdm=False)
    assert len(reports) == sum(len(o.outputs[0].token_ids) for o in loud)
    assert [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in quiet] == \
        [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in loud]


def test_prompt_chunks_and_admissions_are_chained(tiny_qwen2):
    """With a small token budget, prompts are cut into chunks, requests finish their prompt while
    others decode, and waiting requests are admitted into chained steps: greedy outputs still
    equal HF and the synchronous engine, prefix-cache hits included, and every block comes back."""
    shared = "The quick brown fox jumps over the lazy dog " * 2
    prompts = PROMPTS + [shared + "and runs", shared + "and sleeps", "x y z " * 9]
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (9, 3, 14, 1, 7, 11, 6, 2)]
    results = []
    for async_on in (True, False):
        llm = _llm(tiny_qwen2, async_on, block_size=4, max_num_batched_tokens=8, max_num_seqs=3,
                   enable_prefix_caching=True)
        runner = llm.core.runner
        orig = runner.launch
        kinds = {"chunk": 0, "admitted": 0, "first_decode": 0}

        def launch(sched_out, prev=None, orig=orig, kinds=kinds):
            if prev is not None:
                for req, n in sched_out.scheduled:
                    start = req.num_computed_tokens + req.num_inflight_tokens
                    kinds["chunk"] += n > 1 and req.num_inflight_tokens > 0
                    kinds["admitted"] += req.num_inflight_tokens == 0
                    kinds["first_decode"] += req.num_pending_tokens == 1 and start == req.num_prompt_tokens
            return orig(sched_out, prev)

        runner.launch = launch
        outs = llm.generate(prompts, params, use_tqdm=False)
        if async_on:
            assert all(v > 0 for v in kinds.values()), kinds
        else:
            assert not any(kinds.values())
        assert_all_blocks_returned(llm)
        results.append([o.outputs[0].token_ids for o in outs])
    assert results[0] == results[1]
    tok = llm.get_tokenizer()
    for ids, p, got in zip((tok(p).input_ids for p in prompts), params, results[0]):
        assert got == tiny_models.hf_greedy(tiny_qwen2, [ids], p.max_tokens)[0]
