"""The async engine (core in a child process): streaming, concurrency, abort, errors."""

from __future__ import annotations

import asyncio

import pytest
from tiny_models import hf_greedy

from engine import EngineArgs, SamplingParams
from engine.async_llm import AsyncLLM, EngineDeadError
from engine.output_processor import OutputKind


@pytest.fixture(scope="module")
def engine(tiny_qwen2):
    eng = AsyncLLM(EngineArgs(model=str(tiny_qwen2), dtype="float32", device="cpu", max_model_len=256))
    yield eng
    eng.shutdown()


async def _collect(eng, prompt, params, rid, kind=OutputKind.DELTA):
    text, ids, finishes, outs = "", [], [], 0
    async for out in eng.generate(prompt, params, rid, kind):
        outs += 1
        c = out.outputs[0]
        text += c.text
        ids += c.token_ids
        if c.finish_reason is not None:
            finishes.append(c.finish_reason)
    return text, ids, finishes, outs


def test_streamed_deltas_equal_hf_greedy(engine, tiny_qwen2):
    prompts = ["Hello there", "The quick brown fox jumps over the lazy dog " * 3, "a"]
    params = SamplingParams(temperature=0, max_tokens=12)

    async def run():
        return await asyncio.gather(*[_collect(engine, p, params, f"s{i}") for i, p in enumerate(prompts)])

    results = asyncio.run(run())
    tok = engine.tokenizer
    expected = hf_greedy(tiny_qwen2, [tok(p).input_ids for p in prompts], 12)
    for (text, ids, finishes, outs), ref in zip(results, expected):
        assert ids == ref
        assert text == tok.decode(ref, skip_special_tokens=True)
        assert len(finishes) == 1  # exactly one finish_reason, on the last delta
        assert outs >= 2  # it streamed


def test_cumulative_outputs_grow(engine):
    async def run():
        seen = []
        async for out in engine.generate("Hello", SamplingParams(temperature=0, max_tokens=5), "cum"):
            seen.append(list(out.outputs[0].token_ids))
        return seen

    seen = asyncio.run(run())
    # A consumer that is behind gets only the newest cumulative output (the ones it missed are
    # its prefixes), so lengths grow strictly but may skip.
    lengths = [len(s) for s in seen]
    assert lengths == sorted(set(lengths)) and lengths[0] >= 1 and lengths[-1] == 5
    assert all(seen[-1][: len(s)] == s for s in seen)


def test_abort_frees_blocks_and_other_requests_finish(engine):
    async def run():
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        other = asyncio.create_task(_collect(engine, "keep going", SamplingParams(temperature=0, max_tokens=20), "k"))
        gen = engine.generate("abort me please", long, "ab")
        async for _ in gen:
            break  # the consumer goes away after the first token
        await gen.aclose()
        text, ids, finishes, _ = await other
        await asyncio.sleep(0.3)  # let the core report its state after the abort
        return ids, finishes

    ids, finishes = asyncio.run(run())
    assert len(ids) == 20 and finishes == ["length"]
    assert engine.stats.num_running == 0 and engine.stats.num_waiting == 0
    assert engine.stats.kv_cache_usage == 0.0
    assert engine.num_unfinished() == 0


def test_cancelled_task_aborts(engine):
    async def run():
        task = asyncio.create_task(
            _collect(engine, "cancel me", SamplingParams(temperature=0, max_tokens=300, ignore_eos=True), "c")
        )
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)

    asyncio.run(run())
    assert engine.stats.num_running == 0 and engine.stats.kv_cache_usage == 0.0


def test_bad_input_raises_and_engine_keeps_serving(engine):
    async def run():
        with pytest.raises(ValueError, match="prompt"):
            await _collect(engine, {"prompt_token_ids": [1] * 300}, SamplingParams(max_tokens=1), "big")
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=-1)
        return await _collect(engine, "still alive", SamplingParams(temperature=0, max_tokens=3), "ok")

    text, ids, finishes, _ = asyncio.run(run())
    assert len(ids) == 3 and finishes == ["length"]


def test_duplicate_request_id_rejected(engine):
    async def run():
        gen = engine.generate("one", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), "dup")
        await gen.__anext__()
        with pytest.raises(ValueError, match="request_id"):
            await _collect(engine, "two", SamplingParams(max_tokens=2), "dup")
        await gen.aclose()

    asyncio.run(run())


def test_n_samples_stream(engine):
    async def run():
        final = None
        async for out in engine.generate("sample", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6), "n3",
                                         OutputKind.FINAL_ONLY):
            final = out
        return final

    final = asyncio.run(run())
    assert final.finished and sorted(c.index for c in final.outputs) == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in final.outputs)


def test_dead_core_fails_requests(tiny_llama):
    eng = AsyncLLM(EngineArgs(model=str(tiny_llama), dtype="float32", device="cpu", max_model_len=128))
    try:
        eng._proc.kill()
        eng._proc.wait()

        async def run():
            await asyncio.sleep(0.2)
            with pytest.raises(EngineDeadError):
                await _collect(eng, "hello", SamplingParams(max_tokens=2), "x")

        asyncio.run(run())
        assert not eng.is_running
    finally:
        eng.shutdown()


def test_delta_outputs_send_each_finish_once(engine):
    """n=2 where sample 0 finishes a step before sample 1: its finish goes out exactly once."""
    from engine.engine_core import EngineCoreOutput
    from engine.output_processor import OutputProcessor

    op = OutputProcessor(engine.tokenizer)
    params = SamplingParams(max_tokens=5)
    op.add_request("r", "p", [1, 2], {"0_r": params, "1_r": params}, OutputKind.DELTA)
    steps = [
        [EngineCoreOutput("0_r", [5]), EngineCoreOutput("1_r", [6])],
        [EngineCoreOutput("0_r", [7], finish_reason="length"), EngineCoreOutput("1_r", [8])],
        [EngineCoreOutput("1_r", [9])],
        [EngineCoreOutput("1_r", [10], finish_reason="length")],
    ]
    finishes = {0: 0, 1: 0}
    finished_flags = []
    for step in steps:
        ready, _ = op.process(step)
        for out in ready:
            finished_flags.append(out.finished)
            for c in out.outputs:
                finishes[c.index] += c.finish_reason is not None
    assert finishes == {0: 1, 1: 1}
    assert finished_flags == [False, False, False, True]
