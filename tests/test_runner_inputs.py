"""The model runner's decode-only input construction (vectorised, persistent block table) gives the
same ForwardBatch as the general per-request path, across steps where rows change requests, block
lists grow, and requests are preempted and come back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.model_runner import ModelRunner
from engine.request import EngineRequest, Request
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerOutput

BS = 4


def _runner(mrope: bool) -> ModelRunner:
    r = object.__new__(ModelRunner)
    r.block_size = BS
    r.uses_mrope = mrope
    r.device = torch.device("cpu")
    r._init_input_buffers(max_num_seqs=16, max_model_len=256)
    return r


def _request(i: int, rng: np.random.Generator, mrope: bool) -> Request:
    plen = int(rng.integers(1, 20))
    er = EngineRequest(str(i), rng.integers(0, 1000, plen).tolist(), SamplingParams(max_tokens=100))
    if mrope:
        er.mrope_positions = torch.from_numpy(rng.integers(0, 50, (3, plen)))
        er.mrope_delta = int(rng.integers(-30, 30))
    req = Request(er, 256)
    req.append_token(int(rng.integers(0, 1000)))
    req.num_computed_tokens = req.num_tokens - 1
    return req


def _grow(req: Request, next_block: list[int]) -> None:
    while len(req.block_ids) * BS < req.num_tokens:
        req.block_ids.append(next_block[0])
        next_block[0] += 1


def _assert_same(a, b) -> None:
    for name in ("input_ids", "positions", "logits_indices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("slot_mapping", "block_tables", "query_start_loc", "seq_lens"):
        x, y = getattr(a.attn, name), getattr(b.attn, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    for name in ("max_query_len", "max_seq_len", "block_size", "query_start_loc_cpu", "seq_lens_cpu"):
        assert getattr(a.attn, name) == getattr(b.attn, name), name
    assert [r.request_id for r in a.sample_reqs] == [r.request_id for r in b.sample_reqs]
    assert a.prompt_rows == b.prompt_rows and a.mm_slices == b.mm_slices and a.pool_rows == b.pool_rows


@pytest.mark.parametrize("mrope", [False, True])
def test_decode_fast_path_matches_general(mrope: bool) -> None:
    rng = np.random.default_rng(1)
    runner = _runner(mrope)
    next_block = [1]
    pool = [_request(i, rng, mrope) for i in range(24)]
    for r in pool:
        _grow(r, next_block)
    counter = 24
    fast_steps = 0
    for step in range(60):
        batch = [pool[i] for i in sorted(rng.choice(len(pool), int(rng.integers(1, 16)), replace=False))]
        if step % 3 == 0:
            rng.shuffle(batch)
        out = SchedulerOutput([(r, 1) for r in batch], len(batch))
        assert runner._decode_only(out, False)
        fast = runner.prepare(out)
        fast_steps += 1
        _assert_same(fast, runner._prepare_general(out))
        for r in batch:  # "sample" a token and advance
            r.num_computed_tokens += 1
            r.append_token(int(rng.integers(0, 1000)))
            _grow(r, next_block)
        if step % 7 == 0:  # a request is preempted and recomputed with new blocks
            victim = pool[int(rng.integers(0, len(pool)))]
            victim.block_ids = []
            _grow(victim, next_block)
        if step % 11 == 0:  # a request finishes and a new one takes its place
            pool[int(rng.integers(0, len(pool)))] = _request(counter, rng, mrope)
            _grow(pool[-1], next_block)
            for r in pool:
                _grow(r, next_block)
            counter += 1
        if step % 13 == 5:  # a non-decode step in between (prompt chunk)
            fresh = _request(counter, rng, mrope)
            counter += 1
            fresh.num_computed_tokens = 0
            _grow(fresh, next_block)
            runner.prepare(SchedulerOutput([(fresh, fresh.num_tokens)], fresh.num_tokens))
    assert fast_steps == 60


def test_non_decode_steps_use_general_path() -> None:
    rng = np.random.default_rng(2)
    runner = _runner(False)
    req = _request(0, rng, False)
    req.num_computed_tokens = 0
    _grow(req, [1])
    assert not runner._decode_only(SchedulerOutput([(req, req.num_tokens)], req.num_tokens), False)
