"""Unit tests of the paged KV-cache BlockManager: allocation bookkeeping, the null block,
reference counts of shared prefix blocks, prefix-cache hashing (chaining, extra keys, the
last-token rule), LRU eviction of freed cached blocks, statistics and reset."""

from __future__ import annotations

import math

import pytest

from engine.block_manager import BlockManager
from engine.request import EngineRequest, Request
from engine.sampling_params import SamplingParams

BS = 4  # block size used by most tests


def make_req(rid, tokens, *, prompt_logprobs=None, extra=None, max_model_len=4096) -> Request:
    params = SamplingParams(max_tokens=16, prompt_logprobs=prompt_logprobs)
    er = EngineRequest(rid, list(tokens), params, block_extra_keys=dict(extra or {}))
    return Request(er, max_model_len)


def admit(bm: BlockManager, req: Request) -> list[int]:
    """Admit a fresh request the way the scheduler does (prefix hits, then the rest of the prompt)
    and mark the whole prompt computed, as if the model had run. Returns the prefix hits."""
    hits = bm.get_computed_blocks(req)
    num_new = req.num_tokens - len(hits) * bm.block_size
    assert bm.can_allocate(req, num_new, hits)
    bm.allocate(req, num_new, hits)
    req.num_computed_tokens += num_new
    return hits


def snapshot(bm: BlockManager, *reqs: Request):
    return (
        list(bm.free),
        dict(bm.cached),
        [(b.ref_cnt, b.hash) for b in bm.blocks],
        [(list(r.block_ids), r.num_computed_tokens) for r in reqs],
    )


def toks(start, n):
    return list(range(start, start + n))


# -- null block & bookkeeping ------------------------------------------------------------------


def test_null_block_never_handed_out():
    bm = BlockManager(num_blocks=9, block_size=BS, enable_prefix_caching=True)
    assert bm.num_usable_blocks == 8 and bm.num_free_blocks == 8
    assert 0 not in bm.free
    reqs = []
    for i in range(4):  # 4 requests x 2 blocks = the whole pool
        r = make_req(f"r{i}", toks(100 * i, 7))
        admit(bm, r)
        reqs.append(r)
    ids = [b for r in reqs for b in r.block_ids]
    assert sorted(ids) == list(range(1, 9))
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(make_req("x", [1]), 1)
    # free and reuse: still never block 0
    for r in reqs:
        bm.free_request(r)
    assert bm.num_free_blocks == 8 and 0 not in bm.free
    r = make_req("big", toks(5000, 32))
    admit(bm, r)
    assert 0 not in r.block_ids and sorted(r.block_ids) == list(range(1, 9))
    assert bm.blocks[0].ref_cnt == 0 and bm.blocks[0].hash is None


@pytest.mark.parametrize("num_tokens", [1, 3, 4, 5, 8, 9, 17, 31])
def test_allocate_and_free_bookkeeping(num_tokens):
    bm = BlockManager(num_blocks=12, block_size=BS, enable_prefix_caching=True)
    r = make_req("a", toks(10, num_tokens))
    assert bm.get_computed_blocks(r) == []
    bm.allocate(r, num_tokens)
    n = math.ceil(num_tokens / BS)
    assert len(r.block_ids) == n
    assert len(set(r.block_ids)) == n
    assert bm.num_free_blocks == 11 - n
    assert all(bm.blocks[b].ref_cnt == 1 for b in r.block_ids)
    assert not set(r.block_ids) & set(bm.free)
    bm.free_request(r)
    assert r.block_ids == []
    assert bm.num_free_blocks == 11
    assert all(b.ref_cnt == 0 for b in bm.blocks)


def test_incremental_decode_allocation():
    """Decode steps grow the block list only when a block boundary is crossed."""
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    r = make_req("a", toks(10, 6))
    admit(bm, r)
    assert len(r.block_ids) == 2
    for step in range(10):
        r.append_token(1000 + step)
        assert bm.can_allocate(r, 1)
        bm.allocate(r, 1)
        r.num_computed_tokens += 1
        assert len(r.block_ids) == math.ceil(r.num_tokens / BS)
        assert bm.num_free_blocks == 9 - len(r.block_ids)
    # generated tokens are cached too: a prompt equal to prompt+outputs hits every full block
    # except the one holding the last token
    r2 = make_req("b", r.all_token_ids + [7])
    hits = bm.get_computed_blocks(r2)
    assert hits == r.block_ids[: r.num_tokens // BS]


def test_can_allocate_short_pool_leaves_state_unchanged():
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)  # 3 usable
    holder = make_req("h", toks(500, 4))
    admit(bm, holder)  # 1 block held -> 2 free
    r = make_req("a", toks(10, 9))  # needs 3 blocks
    before = snapshot(bm, r, holder)
    assert not bm.can_allocate(r, 9)
    assert snapshot(bm, r, holder) == before  # checking is side-effect free
    assert bm.can_allocate(r, 8)  # 2 blocks fit exactly
    assert snapshot(bm, r, holder) == before
    bm.free_request(holder)
    assert bm.can_allocate(r, 9)
    assert bm.can_allocate(r, 12)
    assert not bm.can_allocate(r, 13)


def test_can_allocate_counts_reclaimed_cached_blocks():
    """Freed cached blocks are both 'free' and 'hits': taking them as hits must not count them twice."""
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)  # 3 usable
    a = make_req("a", toks(10, 8))
    admit(bm, a)  # 2 full cached blocks
    a_blocks = list(a.block_ids)
    bm.free_request(a)
    assert bm.num_free_blocks == 3
    b = make_req("b", toks(10, 8) + toks(900, 5))  # 13 tokens -> 4 blocks total
    hits = bm.get_computed_blocks(b)
    assert hits == a_blocks
    # 2 hits (both sitting in the free list) + 2 fresh blocks > 3 usable
    assert not bm.can_allocate(b, 5, hits)
    c = make_req("c", toks(10, 8) + toks(900, 4))  # 12 tokens -> 3 blocks total
    hits_c = bm.get_computed_blocks(c)
    assert len(hits_c) == 2
    assert bm.can_allocate(c, 4, hits_c)
    bm.allocate(c, 4, hits_c)
    assert c.num_computed_tokens == 8
    assert len(c.block_ids) == 3 and c.block_ids[:2] == hits_c
    assert bm.num_free_blocks == 0


# -- prefix caching ----------------------------------------------------------------------------


def test_shared_prefix_ref_counts():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    prefix = toks(10, 8)  # two full blocks
    a = make_req("a", prefix + [77, 78])
    admit(bm, a)
    free_after_a = bm.num_free_blocks
    b = make_req("b", prefix + [90, 91, 92])
    hits = bm.get_computed_blocks(b)
    assert hits == a.block_ids[:2]
    bm.allocate(b, b.num_tokens - 8, hits)
    assert b.num_computed_tokens == 8
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]
    assert bm.num_free_blocks == free_after_a - 1  # only b's own tail block was new
    for blk in hits:
        assert bm.blocks[blk].ref_cnt == 2
    bm.free_request(a)
    for blk in hits:
        assert bm.blocks[blk].ref_cnt == 1
        assert blk not in bm.free
    assert a.block_ids == []
    assert bm.blocks[b.block_ids[2]].ref_cnt == 1
    bm.free_request(b)
    assert bm.num_free_blocks == bm.num_usable_blocks
    assert all(blk.ref_cnt == 0 for blk in bm.blocks)


def test_last_token_never_served_from_cache():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    a = make_req("a", toks(10, 8))  # exactly 2 full blocks
    admit(bm, a)
    b = make_req("b", toks(10, 8))
    hits = bm.get_computed_blocks(b)
    assert hits == a.block_ids[:1]  # the block holding the last token is recomputed
    bm.allocate(b, 4, hits)
    assert b.num_computed_tokens == 4
    # a one-block prompt gets no hit at all
    c = make_req("c", toks(10, 4))
    assert bm.get_computed_blocks(c) == []
    # one more token than 2 blocks: both full blocks hit
    d = make_req("d", toks(10, 8) + [5])
    assert bm.get_computed_blocks(d) == a.block_ids[:2]


def test_changed_token_breaks_chain():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    base = toks(10, 13)  # 3 full blocks + 1
    a = make_req("a", base)
    admit(bm, a)
    same = make_req("same", base)
    assert bm.get_computed_blocks(same) == a.block_ids[:3]
    # a different token inside block 1: block 0 still hits, blocks 1 and 2 do not
    t = list(base)
    t[5] = 999
    b = make_req("b", t)
    assert bm.get_computed_blocks(b) == a.block_ids[:1]
    # a different token inside block 0: nothing hits, even though blocks 1-2 are identical
    t = list(base)
    t[0] = 999
    c = make_req("c", t)
    assert bm.get_computed_blocks(c) == []


def test_block_extra_keys():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    base = toks(10, 9)  # 2 full blocks + 1
    a = make_req("a", base, extra={0: ("img-hash-1",)})
    admit(bm, a)
    # identical tokens, no extra key -> miss
    assert bm.get_computed_blocks(make_req("b", base)) == []
    # identical tokens, another image -> miss
    assert bm.get_computed_blocks(make_req("c", base, extra={0: ("img-hash-2",)})) == []
    # same image -> hit on both full blocks
    assert bm.get_computed_blocks(make_req("d", base, extra={0: ("img-hash-1",)})) == a.block_ids[:2]

    # an extra key on block 1 only: block 0 is shared, block 1 differs
    e = make_req("e", toks(300, 9), extra={1: ("img-x",)})
    admit(bm, e)
    assert bm.get_computed_blocks(make_req("f", toks(300, 9))) == e.block_ids[:1]
    assert bm.get_computed_blocks(make_req("g", toks(300, 9), extra={1: ("img-y",)})) == e.block_ids[:1]
    assert bm.get_computed_blocks(make_req("h", toks(300, 9), extra={1: ("img-x",)})) == e.block_ids[:2]


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=5, block_size=BS, enable_prefix_caching=True)  # 4 usable
    a = make_req("a", toks(10, 12))  # 3 full blocks
    admit(bm, a)
    a_blocks = list(a.block_ids)
    bm.free_request(a)
    assert bm.num_free_blocks == 4

    # still hittable after free, and taking the hits removes them from the free list
    a2 = make_req("a2", toks(10, 12) + [1])
    hits = bm.get_computed_blocks(a2)
    assert hits == a_blocks
    bm.allocate(a2, 1, hits)
    assert a2.block_ids[:3] == a_blocks
    assert all(bm.blocks[b].ref_cnt == 1 for b in a_blocks)
    assert bm.num_free_blocks == 0
    bm.free_request(a2)
    assert bm.num_free_blocks == 4

    # a new, unrelated allocation of 2 blocks: the never-used/oldest free block goes first, then
    # a2's tail, then a's last full block -- the shared prefix is evicted last
    b = make_req("b", toks(700, 8))
    admit(bm, b)
    assert a_blocks[0] not in b.block_ids and a_blocks[1] not in b.block_ids
    a3 = make_req("a3", toks(10, 12) + [1])
    hits = bm.get_computed_blocks(a3)
    assert hits == a_blocks[:2]  # a's third block was evicted (tail first), the prefix survives

    # evict further: one more block goes, taking a's block 1
    c = make_req("c", toks(800, 4))
    admit(bm, c)
    assert bm.get_computed_blocks(make_req("a4", toks(10, 12) + [1])) == a_blocks[:1]
    # and the last one
    d = make_req("d", toks(900, 1))
    admit(bm, d)
    assert bm.get_computed_blocks(make_req("a5", toks(10, 12) + [1])) == []
    assert bm.num_free_blocks == 0


def test_evicted_block_rehashed_for_new_content():
    """A reused block must not keep serving its old content under the old hash."""
    bm = BlockManager(num_blocks=3, block_size=BS, enable_prefix_caching=True)  # 2 usable
    a = make_req("a", toks(10, 8))
    admit(bm, a)
    bm.free_request(a)
    b = make_req("b", toks(500, 8))  # takes both blocks, overwriting a's content
    admit(bm, b)
    b_blocks = list(b.block_ids)
    bm.free_request(b)
    assert bm.get_computed_blocks(make_req("a2", toks(10, 8) + [1])) == []
    assert bm.get_computed_blocks(make_req("b2", toks(500, 8) + [1])) == b_blocks


def test_hit_statistics():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    assert bm.num_queried_tokens == 0 and bm.num_hit_tokens == 0
    a = make_req("a", toks(10, 10))
    admit(bm, a)
    assert bm.num_queried_tokens == 10 and bm.num_hit_tokens == 0
    b = make_req("b", toks(10, 9))
    admit(bm, b)  # 2 full blocks hit
    assert bm.num_queried_tokens == 19 and bm.num_hit_tokens == 8
    c = make_req("c", toks(10, 5) + [999])
    admit(bm, c)  # block 0 hits
    assert bm.num_queried_tokens == 25 and bm.num_hit_tokens == 12


def test_prefix_caching_disabled_no_hits():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    a = make_req("a", toks(10, 13))
    admit(bm, a)
    b = make_req("b", toks(10, 13))
    assert bm.get_computed_blocks(b) == []
    admit(bm, b)
    assert not set(a.block_ids) & set(b.block_ids)
    assert bm.cached == {}
    bm.free_request(a)
    assert bm.get_computed_blocks(make_req("c", toks(10, 13))) == []
    assert bm.num_hit_tokens == 0


def test_prompt_logprobs_requests_get_no_hits():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    a = make_req("a", toks(10, 13))
    admit(bm, a)
    b = make_req("b", toks(10, 13), prompt_logprobs=1)
    assert bm.get_computed_blocks(b) == []
    b0 = make_req("b0", toks(10, 13), prompt_logprobs=0)
    assert bm.get_computed_blocks(b0) == []
    # the same prompt without prompt_logprobs does hit
    assert bm.get_computed_blocks(make_req("c", toks(10, 13))) == a.block_ids[:3]


def test_usage():
    bm = BlockManager(num_blocks=9, block_size=BS, enable_prefix_caching=True)  # 8 usable
    assert bm.usage() == pytest.approx(0.0)
    a = make_req("a", toks(10, 16))
    admit(bm, a)
    assert bm.usage() == pytest.approx(0.5)
    b = make_req("b", toks(100, 6))
    admit(bm, b)
    assert bm.usage() == pytest.approx(6 / 8)
    c = make_req("c", toks(200, 8))
    admit(bm, c)
    assert bm.usage() == pytest.approx(1.0)
    bm.free_request(a)
    bm.free_request(b)
    bm.free_request(c)
    assert bm.usage() == pytest.approx(0.0)  # cached-but-free blocks count as free


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    a = make_req("a", toks(10, 13))
    admit(bm, a)
    assert not bm.reset_prefix_cache()  # a request still holds blocks
    assert bm.get_computed_blocks(make_req("x", toks(10, 13))) == a.block_ids[:3]
    bm.free_request(a)
    assert bm.get_computed_blocks(make_req("y", toks(10, 13))) != []
    assert bm.reset_prefix_cache()
    assert bm.cached == {}
    assert all(b.hash is None for b in bm.blocks)
    assert bm.get_computed_blocks(make_req("z", toks(10, 13))) == []
    assert bm.num_free_blocks == bm.num_usable_blocks
    # caching works again afterwards
    b = make_req("b", toks(10, 13))
    admit(bm, b)
    assert bm.get_computed_blocks(make_req("w", toks(10, 13))) == b.block_ids[:3]


def test_lookups_of_a_blocked_request_are_not_counted():
    bm = BlockManager(num_blocks=3, block_size=BS, enable_prefix_caching=True)
    a = make_req("a", toks(10, 2 * BS))
    admit(bm, a)
    queried = bm.num_queried_tokens
    b = make_req("b", toks(10, 2 * BS))
    for _ in range(3):  # what the scheduler does each step while b cannot be admitted
        computed = bm.get_computed_blocks(b)
        assert not bm.can_allocate(b, b.num_tokens - len(computed) * BS, computed)
    assert bm.num_queried_tokens == queried
