"""The MLU backend's selection, cache layout and argument plumbing, on CPU.

No MLU hardware exists here, so ``torch_mlu_ops`` is replaced by a stand-in written from the ops'
documented semantics (in the MLU cache layout, with plain dense math). The backend, driving it,
must give the torch reference backend's results; what this cannot show is that Cambricon's real
ops behave as documented.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from paged_cases import build_metadata

from kernels import registry
from kernels.torch_ref import TorchReferenceBackend


def _dense(q, k, v, scale, causal_offset):
    # q: [Q, H, D]; k, v: [L, Hkv, D]; query row j sits at position causal_offset + j
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    pos = torch.arange(q.shape[0])[:, None] + causal_offset
    s = s.masked_fill(torch.arange(k.shape[0])[None, :] > pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.double()).to(q.dtype)


def _gather(cache, table, length):
    # cache: [num_blocks, Hkv, block_size, D] -> [length, Hkv, D]
    return cache[table.long()].permute(0, 2, 1, 3).reshape(-1, cache.shape[1], cache.shape[3])[:length]


def _fake_ops() -> types.ModuleType:
    ops = types.ModuleType("torch_mlu_ops")

    def reshape_paged_cache(k, v, k_cache, v_cache, slot_mapping):
        assert slot_mapping.dtype == torch.int32
        bs = k_cache.shape[2]
        for t, slot in enumerate(slot_mapping.tolist()):
            k_cache[slot // bs, :, slot % bs] = k[t]
            v_cache[slot // bs, :, slot % bs] = v[t]

    def flash_attention(q, k_cache, v_cache, out, cu_q, cu_kv, alibi, bias, max_q, max_kv, scale, is_causal,
                        wl, wr, compute_dtype, return_lse, block_tables):
        assert is_causal and alibi is None and bias is None and block_tables is not None
        cu_q, cu_kv = cu_q.tolist(), cu_kv.tolist()
        for i in range(len(cu_q) - 1):
            qlen, kvlen = cu_q[i + 1] - cu_q[i], cu_kv[i + 1] - cu_kv[i]
            k = _gather(k_cache, block_tables[i], kvlen)
            v = _gather(v_cache, block_tables[i], kvlen)
            out[cu_q[i] : cu_q[i + 1]] = _dense(q[cu_q[i] : cu_q[i + 1]], k, v, scale, kvlen - qlen)

    def single_query_cached_kv_attn(q, k_cache, v_cache, out, block_tables, context_lens, ks, vs, alibi,
                                    max_len, wl, wr, scale):
        assert q.dim() == 4 and q.shape[1] == 1
        for i, length in enumerate(context_lens.tolist()):
            k = _gather(k_cache, block_tables[i], length)
            v = _gather(v_cache, block_tables[i], length)
            out[i] = _dense(q[i], k, v, scale, length - 1)

    ops.reshape_paged_cache = reshape_paged_cache
    ops.flash_attention = flash_attention
    ops.single_query_cached_kv_attn = single_query_cached_kv_attn
    return ops


@pytest.fixture
def fake_ops(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_mlu_ops", _fake_ops())
    monkeypatch.setattr(registry, "_INSTANCES", {})
    yield
    registry._INSTANCES.pop("mlu_ops", None)


def test_mlu_prefers_cambricon_ops_when_importable(fake_ops):
    assert registry.get_backend("mlu").name == "mlu_ops"


def test_mlu_falls_back_to_reference_without_ops(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_mlu_ops", None)  # import raises ImportError
    monkeypatch.setattr(registry, "_INSTANCES", {})
    assert registry.get_backend("mlu").name == "torch"
    assert registry.get_backend("cpu").name == "torch"  # and never on other devices


def test_mlu_cache_layout():
    from kernels.mlu_ops import MLUOpsBackend

    assert MLUOpsBackend.kv_cache_shape(None, 10, 16, 2, 64) == (2, 10, 2, 16, 64)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_mlu_backend_matches_reference(fake_ops, heads, kv_heads):
    from kernels.mlu_ops import MLUOpsBackend

    torch.manual_seed(0)
    bs, dim, num_blocks, scale = 8, 16, 24, 0.3
    mlu, ref = MLUOpsBackend(), TorchReferenceBackend()
    caches = {
        b: torch.zeros(b.kv_cache_shape(num_blocks, bs, kv_heads, dim)) for b in (mlu, ref)
    }
    blocks = [[5, 3, 17], [9, 1], [20, 11, 7, 2]]
    # (context lengths after the step, new tokens per sequence): a fresh prefill, then chunks over
    # cached context (sequence 1 idle), then a decode-only step
    steps = [([11, 10, 4], [11, 10, 4]), ([19, 10, 30], [8, 0, 26]), ([20, 11, 31], [1, 1, 1])]
    for seq_lens, qlens in steps:
        keep = [i for i, q in enumerate(qlens) if q > 0]
        meta = build_metadata([(seq_lens[i], qlens[i]) for i in keep], [blocks[i] for i in keep], bs)
        n = sum(qlens)
        q = torch.randn(n, heads, dim)
        k = torch.randn(n, kv_heads, dim)
        v = torch.randn(n, kv_heads, dim)
        outs = {}
        for b in (mlu, ref):
            b.write_kv(k, v, caches[b], meta.slot_mapping)
            outs[b] = b.attend(q, caches[b], meta, scale)
        torch.testing.assert_close(outs[mlu], outs[ref], rtol=1e-4, atol=1e-5)
