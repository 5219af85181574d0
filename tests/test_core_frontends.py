"""Several front ends (AsyncLLMs, as separate API processes would hold) sharing one engine core.

The head starts the core; another attaches through ``head.core_address``. Each must get exactly
its own requests' outputs, equal to HF's greedy tokens, while both stream at once; an attached
front end that goes away has its requests aborted and leaves the core serving the head; the
head's shutdown stops the core.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from tiny_models import hf_greedy

from engine import EngineArgs, SamplingParams
from engine.async_llm import AsyncLLM
from engine.output_processor import OutputKind

PROMPTS = ["Hello there", "The quick brown fox", "a b c d", "Once upon a time"]


@pytest.fixture(scope="module")
def args(tiny_qwen2):
    return EngineArgs(model=str(tiny_qwen2), dtype="float32", device="cpu", max_model_len=256)


async def _ids(eng: AsyncLLM, prompt: str, rid: str, max_tokens: int = 12) -> list[int]:
    ids: list[int] = []
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    async for out in eng.generate(prompt, params, rid, OutputKind.DELTA):
        ids += out.outputs[0].token_ids
    return ids


def test_two_front_ends_share_one_core(args, tiny_qwen2):
    head = AsyncLLM(args)
    try:
        other = AsyncLLM(args, attach=head.core_address)
        tok = head.tokenizer
        expected = hf_greedy(tiny_qwen2, [tok(p).input_ids for p in PROMPTS], 12)

        # Request ids are unique per server (uuid-based); here they differ by front end.
        async def distinct():
            jobs = [_ids(eng, p, f"{tag}{i}") for eng, tag in ((head, "h"), (other, "o"))
                    for i, p in enumerate(PROMPTS)]
            return await asyncio.gather(*jobs)

        results = asyncio.run(distinct())
        assert results[: len(PROMPTS)] == expected
        assert results[len(PROMPTS):] == expected
        other.shutdown()
        assert head.is_running
    finally:
        head.shutdown()
    assert not head.is_running


def test_a_detached_front_end_has_its_requests_aborted(args):
    head = AsyncLLM(args)
    try:
        other = AsyncLLM(args, attach=head.core_address)

        async def start_long() -> None:
            params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
            async for _ in other.generate("Hello there", params, "long", OutputKind.DELTA):
                break  # it runs in the core now; leave it there and go away

        asyncio.run(start_long())
        # The generator's exit aborts the request in the core: start another one and detach
        # without aborting it, as a crashed API process would.
        loop = asyncio.new_event_loop()
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        agen = other.generate("Hello there", params, "orphan", OutputKind.DELTA)
        loop.run_until_complete(agen.__anext__())
        other._conn.close()  # the connection drops without a word (a killed process)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and head.stats.num_running:
            asyncio.run(_ids(head, "a", f"tick{deadline}", 1))
            time.sleep(0.05)
        assert head.stats.num_running == 0  # the orphan was aborted, not left decoding
        assert asyncio.run(_ids(head, PROMPTS[0], "after")) != []
        loop.close()
    finally:
        head.shutdown()
