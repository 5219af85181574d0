"""Unit tests of the Scheduler with a real BlockManager and no model.

The model runner is simulated: after ``schedule()``, every request whose scheduled tokens reach
the end of its known tokens gets one sampled token through ``update_from_output``."""

from __future__ import annotations

import itertools
import random

import pytest

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.request import EngineRequest, Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

BS = 4
MAX_LEN = 4096
_TOKENS = itertools.count(1000)  # sampled tokens: never a stop id used below


def make_sched(*, num_blocks=64, max_num_seqs=8, budget=64, chunked=True, caching=True, block_size=BS):
    cfg = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=MAX_LEN,
        enable_chunked_prefill=chunked,
    )
    return Scheduler(cfg, BlockManager(num_blocks, block_size, caching))


def make_req(rid, prompt, *, max_tokens=4, params=None, max_model_len=MAX_LEN) -> Request:
    if isinstance(prompt, int):
        rng = random.Random(rid)
        prompt = [rng.randrange(10, 900) for _ in range(prompt)]
    params = params or SamplingParams(max_tokens=max_tokens)
    return Request(EngineRequest(rid, list(prompt), params), max_model_len)


def step(sched: Scheduler, token=None):
    """One engine step: schedule, check invariants, 'run' the model, update."""
    before_running = list(sched.running)
    out = sched.schedule()
    cfg = sched.config
    ids = [r.request_id for r, _ in out.scheduled]
    assert len(ids) == len(set(ids)), "a request was scheduled twice in one step"
    assert all(n > 0 for _, n in out.scheduled)
    assert out.num_batched_tokens == sum(n for _, n in out.scheduled)
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(out.scheduled) <= cfg.max_num_seqs
    assert len(sched.running) <= cfg.max_num_seqs
    for r, n in out.scheduled:
        assert r.status == RequestStatus.RUNNING
        assert r in sched.running
        assert r.num_computed_tokens + n <= r.num_tokens
        # the blocks cover every token computed after this step
        assert len(r.block_ids) * sched.block_manager.block_size >= r.num_computed_tokens + n
    sampled = {}
    for r, n in out.scheduled:
        if r.num_computed_tokens + n == r.num_tokens:
            sampled[r.request_id] = next(_TOKENS) if token is None else token(r)
    sched.update_from_output(out, sampled)
    return out, before_running


def run_to_completion(sched: Scheduler, max_steps=1000, **kw):
    outs = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return outs
        outs.append(step(sched, **kw)[0])
    raise AssertionError("requests did not finish")


def assert_all_blocks_free(sched: Scheduler):
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks
    assert all(b.ref_cnt == 0 for b in bm.blocks)
    assert not sched.running and not sched.waiting and not sched.requests


# -- budget, chunking, slots --------------------------------------------------------------------


def test_token_budget_respected_and_everything_finishes():
    sched = make_sched(num_blocks=256, max_num_seqs=6, budget=32)
    rng = random.Random(0)
    reqs = [make_req(f"r{i}", rng.randrange(1, 70), max_tokens=rng.randrange(1, 9)) for i in range(12)]
    for r in reqs:
        sched.add_request(r)
    outs = run_to_completion(sched)
    assert any(o.num_batched_tokens == 32 for o in outs)  # the budget was actually binding
    for r in reqs:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.num_output_tokens == r.params.max_tokens
        assert r.block_ids == []
    assert_all_blocks_free(sched)


def test_chunked_prefill_splits_prompt_and_samples_after_last_chunk():
    sched = make_sched(budget=16)
    r = make_req("a", 50, max_tokens=3)
    sched.add_request(r)
    chunks = []
    for _ in range(4):
        out, _ = step(sched)
        assert out.scheduled[0][0] is r
        chunks.append(out.scheduled[0][1])
        if sum(chunks) < 50:
            assert r.num_output_tokens == 0, "sampled before the prompt's last chunk"
            assert r.status == RequestStatus.RUNNING
    assert chunks == [16, 16, 16, 2]
    assert r.num_computed_tokens == 50
    assert r.num_output_tokens == 1
    # then one token per decode step
    out, _ = step(sched)
    assert [(q.request_id, n) for q, n in out.scheduled] == [("a", 1)]
    run_to_completion(sched)
    assert r.num_output_tokens == 3 and r.status == RequestStatus.FINISHED_LENGTH
    assert_all_blocks_free(sched)


def test_chunked_prefill_shares_budget_with_second_prompt():
    sched = make_sched(budget=16, chunked=True)
    a, b = make_req("a", 10), make_req("b", 10)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched)
    assert [(q.request_id, n) for q, n in out.scheduled] == [("a", 10), ("b", 6)]
    assert a.num_output_tokens == 1 and b.num_output_tokens == 0
    out, _ = step(sched)
    assert [(q.request_id, n) for q, n in out.scheduled] == [("a", 1), ("b", 4)]
    assert b.num_output_tokens == 1


def test_without_chunked_prefill_prompt_larger_than_remaining_budget_waits():
    sched = make_sched(budget=16, chunked=False)
    a, b = make_req("a", 10, max_tokens=3), make_req("b", 10, max_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched)
    assert [(q.request_id, n) for q, n in out.scheduled] == [("a", 10)]
    assert b.status == RequestStatus.WAITING and list(sched.waiting) == [b]
    assert b.num_computed_tokens == 0 and b.block_ids == []
    out, _ = step(sched)
    assert [(q.request_id, n) for q, n in out.scheduled] == [("a", 1), ("b", 10)]  # whole prompt at once
    run_to_completion(sched)
    for r in (a, b):
        assert r.num_output_tokens == 3
    assert_all_blocks_free(sched)


def test_without_chunked_prefill_never_splits_a_prompt():
    sched = make_sched(budget=24, chunked=False, num_blocks=128)
    rng = random.Random(1)
    reqs = [make_req(f"r{i}", rng.randrange(1, 25), max_tokens=3) for i in range(10)]
    for r in reqs:
        sched.add_request(r)
    while sched.has_unfinished():
        pre = {r.request_id: r.num_computed_tokens for r in reqs}
        out, _ = step(sched)
        for r, n in out.scheduled:
            if pre[r.request_id] == 0:
                assert n == r.num_prompt_tokens
            else:
                assert n == 1
    assert all(r.num_output_tokens == 3 for r in reqs)
    assert_all_blocks_free(sched)


def test_max_num_seqs_respected():
    sched = make_sched(max_num_seqs=2, budget=256)
    reqs = [make_req(f"r{i}", 5, max_tokens=3) for i in range(5)]
    for r in reqs:
        sched.add_request(r)
    out, _ = step(sched)
    assert [q.request_id for q, _ in out.scheduled] == ["r0", "r1"]
    assert len(sched.running) == 2 and len(sched.waiting) == 3
    seen_running = []
    while sched.has_unfinished():
        out, _ = step(sched)
        assert len(out.scheduled) <= 2 and len(sched.running) <= 2
        seen_running.append(len(sched.running))
    assert all(r.num_output_tokens == 3 for r in reqs)
    # FCFS: requests were admitted in arrival order
    order = sorted(reqs, key=lambda r: r.first_scheduled_time)
    assert [r.request_id for r in order] == [f"r{i}" for i in range(5)]
    assert_all_blocks_free(sched)


def test_running_requests_decode_before_new_admissions():
    sched = make_sched(budget=4)
    a, b = make_req("a", 2, max_tokens=10), make_req("b", 2, max_tokens=10)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched)
    assert [(q.request_id, n) for q, n in out.scheduled] == [("a", 2), ("b", 2)]
    c = make_req("c", 8, max_tokens=2)
    sched.add_request(c)
    out, _ = step(sched)
    # oldest first: a, b decode; c gets what is left of the budget
    assert [(q.request_id, n) for q, n in out.scheduled] == [("a", 1), ("b", 1), ("c", 2)]


def test_no_admission_when_decodes_use_the_whole_budget():
    sched = make_sched(budget=2)
    a, b = make_req("a", 1, max_tokens=10), make_req("b", 1, max_tokens=10)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    c = make_req("c", 1)
    sched.add_request(c)
    for _ in range(3):
        out, _ = step(sched)
        assert [(q.request_id, n) for q, n in out.scheduled] == [("a", 1), ("b", 1)]
        assert c.status == RequestStatus.WAITING


def test_running_order_is_oldest_first_under_budget_pressure():
    """Running requests (mid-prefill ones included) are served oldest first before admissions."""
    sched = make_sched(budget=5)
    r0, r1, r2 = make_req("r0", 4, max_tokens=10), make_req("r1", 4, max_tokens=10), make_req("r2", 20)
    for r in (r0, r1, r2):
        sched.add_request(r)
    out, _ = step(sched)
    assert [(q.request_id, n) for q, n in out.scheduled] == [("r0", 4), ("r1", 1)]
    out, _ = step(sched)
    assert [(q.request_id, n) for q, n in out.scheduled] == [("r0", 1), ("r1", 3), ("r2", 1)]
    out, _ = step(sched)
    assert [(q.request_id, n) for q, n in out.scheduled] == [("r0", 1), ("r1", 1), ("r2", 3)]


# -- preemption ---------------------------------------------------------------------------------


def test_preemption_of_newest_request():
    # 6 usable blocks of 4 tokens; three 6-token prompts take 2 blocks each
    sched = make_sched(num_blocks=7, max_num_seqs=3, budget=64, caching=False)
    a, b, c, d = (make_req(x, 6, max_tokens=8) for x in "abcd")
    for r in (a, b, c, d):
        sched.add_request(r)
    out, _ = step(sched)
    assert [q.request_id for q, _ in out.scheduled] == ["a", "b", "c"]
    assert list(sched.waiting) == [d]
    assert sched.block_manager.num_free_blocks == 0
    step(sched)  # 7 tokens: still 2 blocks each
    step(sched)  # 8 tokens
    c_outputs = list(c.output_token_ids)
    c_tokens = c.num_tokens
    # 9 tokens: a needs a third block -> c (newest) is preempted; a and b fit then
    out, _ = step(sched)
    assert out.preempted == ["c"]
    assert [q.request_id for q, _ in out.scheduled] == ["a", "b"]
    assert c.status == RequestStatus.PREEMPTED
    assert c.block_ids == [] and c.num_computed_tokens == 0
    assert c.num_preemptions == 1 and sched.num_preemptions == 1
    assert c.output_token_ids == c_outputs and c.num_tokens == c_tokens  # outputs kept for recompute
    assert list(sched.waiting) == [c, d]  # front of the queue, ahead of d
    assert sched.running == [a, b]
    assert c.request_id in sched.requests
    bm = sched.block_manager
    held = sum(len(r.block_ids) for r in sched.running)
    assert bm.num_free_blocks + held == bm.num_usable_blocks

    run_to_completion(sched)
    for r in (a, b, c, d):
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.num_output_tokens == 8
    assert sched.num_preemptions >= 1
    assert_all_blocks_free(sched)


def test_preemption_keeps_running_with_prefix_cache():
    """Preempted requests are recomputed (possibly from the prefix cache) and still finish."""
    sched = make_sched(num_blocks=9, max_num_seqs=4, budget=32, caching=True)
    reqs = [make_req(f"r{i}", 7, max_tokens=12) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    steps = 0
    while sched.has_unfinished():
        out, before = step(sched)
        steps += 1
        assert steps < 500
        for rid in out.preempted:
            r = next(q for q in reqs if q.request_id == rid)
            assert r.status == RequestStatus.PREEMPTED
            assert r.block_ids == [] and r.num_computed_tokens == 0
            # the newest running requests are the ones preempted
            assert r in before[len(before) - len(out.preempted):]
    assert sched.num_preemptions > 0
    for r in reqs:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.num_output_tokens == 12
    assert_all_blocks_free(sched)


@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workload_under_block_pressure(caching, seed):
    rng = random.Random(seed)
    sched = make_sched(num_blocks=14, max_num_seqs=5, budget=rng.choice([8, 16, 32]), caching=caching)
    reqs = []
    for i in range(10):
        reqs.append(make_req(f"s{seed}-{i}", rng.randrange(1, 20), max_tokens=rng.randrange(1, 15)))
        sched.add_request(reqs[-1])
    steps = 0
    while sched.has_unfinished():
        out, before = step(sched)
        steps += 1
        assert steps < 2000
        if out.preempted:
            # a preempting step admits nothing new
            assert all(r in before for r, _ in out.scheduled)
            # victims are the newest running requests, and they sit at the front of waiting
            victims = [r for r in before if r.request_id in out.preempted]
            assert victims == before[len(before) - len(victims):]
            assert {r.request_id for r in list(sched.waiting)[: len(victims)]} == set(out.preempted)
        if not caching:
            bm = sched.block_manager
            assert bm.num_free_blocks + sum(len(r.block_ids) for r in sched.running) == bm.num_usable_blocks
        for r in sched.waiting:
            assert r.block_ids == [] and r.num_computed_tokens == 0
    for r in reqs:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.num_output_tokens == r.params.max_tokens
    assert_all_blocks_free(sched)


def test_no_new_admissions_in_a_step_that_preempted():
    # 3 usable blocks, budget 2, no prefix cache: after b is preempted one block is free and the
    # remaining budget (1 token) would let b's first chunk back in -- it must wait a step.
    sched = make_sched(num_blocks=4, max_num_seqs=4, budget=2, caching=False)
    a = make_req("a", 2, max_tokens=10)  # 12 tokens: 3 blocks, the whole pool
    b = make_req("b", 5, max_tokens=7)
    sched.add_request(a)
    sched.add_request(b)
    preempting = None
    for _ in range(20):
        waiting_before = list(sched.waiting)
        out, before = step(sched)
        if out.preempted:
            preempting = out
            assert not any(r in waiting_before for r, _ in out.scheduled)
            assert all(r in before for r, _ in out.scheduled)
            break
    assert preempting is not None, "scenario did not preempt"
    assert preempting.preempted == ["b"]
    assert sched.block_manager.num_free_blocks >= 1  # b's first chunk would have fit
    assert b.status == RequestStatus.PREEMPTED and list(sched.waiting) == [b]
    out, _ = step(sched)  # next step: b is readmitted
    assert b in [r for r, _ in out.scheduled]
    run_to_completion(sched)
    assert a.num_output_tokens == 10 and b.num_output_tokens == 7
    assert_all_blocks_free(sched)


# -- aborts and finishing -----------------------------------------------------------------------


def test_abort_waiting_request():
    sched = make_sched(max_num_seqs=1)
    a, b = make_req("a", 5), make_req("b", 5)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    assert b.status == RequestStatus.WAITING
    done = sched.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert done == [b]
    assert b.status == RequestStatus.FINISHED_ABORTED and b.status.finished
    assert b not in sched.waiting and "b" not in sched.requests
    assert b.block_ids == []
    # aborting again or an unknown id is a no-op
    assert sched.finish_requests(["b", "nope"], RequestStatus.FINISHED_ABORTED) == []
    run_to_completion(sched)
    assert a.status == RequestStatus.FINISHED_LENGTH
    assert_all_blocks_free(sched)


def test_abort_running_request_frees_blocks():
    sched = make_sched(num_blocks=32, budget=8)
    a, b = make_req("a", 20, max_tokens=5), make_req("b", 6, max_tokens=5)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # a mid-prefill (chunk of 8)
    assert a.status == RequestStatus.RUNNING and a.block_ids
    bm = sched.block_manager
    free_before = bm.num_free_blocks
    n_a = len(a.block_ids)
    done = sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert done == [a]
    assert a.status == RequestStatus.FINISHED_ABORTED
    assert a.block_ids == [] and a not in sched.running and "a" not in sched.requests
    assert bm.num_free_blocks == free_before + n_a
    run_to_completion(sched)
    assert b.num_output_tokens == 5
    assert a.num_output_tokens == 0
    assert_all_blocks_free(sched)


def test_abort_preempted_request():
    sched = make_sched(num_blocks=7, max_num_seqs=3, budget=64, caching=False)
    reqs = [make_req(x, 6, max_tokens=8) for x in "abc"]
    for r in reqs:
        sched.add_request(r)
    for _ in range(4):
        out, _ = step(sched)
    assert out.preempted == ["c"]
    c = reqs[2]
    assert sched.finish_requests(["c"], RequestStatus.FINISHED_ABORTED) == [c]
    assert c.status == RequestStatus.FINISHED_ABORTED and c not in sched.waiting
    run_to_completion(sched)
    assert_all_blocks_free(sched)


def test_stop_on_eos_token():
    eos = 2
    sched = make_sched()
    params = SamplingParams(max_tokens=10).with_eos(eos)
    r = make_req("a", 5, params=params)
    sched.add_request(r)
    tokens = iter([50, 51, eos, 52])
    run_to_completion(sched, token=lambda req: next(tokens))
    assert r.status == RequestStatus.FINISHED_STOPPED
    assert r.output_token_ids == [50, 51, eos]
    assert r.stop_reason is None  # eos, not a user stop_token_id
    assert_all_blocks_free(sched)


def test_stop_on_stop_token_id():
    sched = make_sched()
    r = make_req("a", 5, params=SamplingParams(max_tokens=10, stop_token_ids=[7]))
    sched.add_request(r)
    tokens = iter([50, 7, 51])
    run_to_completion(sched, token=lambda req: next(tokens))
    assert r.status == RequestStatus.FINISHED_STOPPED
    assert r.stop_reason == 7
    assert r.output_token_ids == [50, 7]
    assert_all_blocks_free(sched)


def test_ignore_eos_and_min_tokens():
    eos = 2
    sched = make_sched()
    r1 = make_req("ign", 3, params=SamplingParams(max_tokens=4, ignore_eos=True).with_eos(eos))
    r2 = make_req("min", 3, params=SamplingParams(max_tokens=6, min_tokens=3).with_eos(eos))
    sched.add_request(r1)
    sched.add_request(r2)
    run_to_completion(sched, token=lambda req: eos)
    assert r1.status == RequestStatus.FINISHED_LENGTH and r1.output_token_ids == [eos] * 4
    assert r2.status == RequestStatus.FINISHED_STOPPED and r2.output_token_ids == [eos] * 3
    assert_all_blocks_free(sched)


def test_finish_on_max_tokens_and_max_model_len():
    sched = make_sched()
    a = make_req("a", 5, max_tokens=3)
    b = make_req("b", 6, params=SamplingParams(max_tokens=None), max_model_len=9)
    sched.add_request(a)
    sched.add_request(b)
    run_to_completion(sched)
    assert a.status == RequestStatus.FINISHED_LENGTH and a.num_output_tokens == 3
    assert b.status == RequestStatus.FINISHED_LENGTH and b.num_tokens == 9 and b.num_output_tokens == 3
    assert_all_blocks_free(sched)


def test_prefix_cache_hit_skips_computed_tokens():
    sched = make_sched(budget=64)
    prompt = list(range(100, 113))  # 3 full blocks + 1
    a = make_req("a", prompt, max_tokens=2)
    sched.add_request(a)
    run_to_completion(sched)
    b = make_req("b", prompt, max_tokens=2)
    sched.add_request(b)
    out, _ = step(sched)
    assert [(q.request_id, n) for q, n in out.scheduled] == [("b", 1)]
    assert b.num_cached_tokens == 12
    run_to_completion(sched)
    assert b.num_output_tokens == 2
    assert_all_blocks_free(sched)
