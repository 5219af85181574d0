"""The Triton backend (kernels/triton_attention.py) against the torch reference backend and a dense
float64 attention, on CUDA.

Skips where triton is not installed or there is no CUDA device. (With ``TRITON_INTERPRET=1`` the
same tests run on CPU through Triton's interpreter, slowly: handy to debug a kernel without a GPU.)

Like tests/test_kernels_reference.py, every case uses scattered, shuffled block ids (never block 0
for real data), caches prefilled with finite garbage (so reading a wrong slot shows up), softmax
scales other than SDPA's default, and lengths that are not multiples of the block size. Both
backends start from the same garbage cache, write the same keys/values through their own
``write_kv``, then attend. The worst relative errors, max|out - ref| / max|ref|, are collected per
(dtype, kind of batch) and printed as a table by the last test (``pytest -s``); with
``VLMSERVE_KERNEL_REPORT=path`` they are also written there as JSON.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.gpu

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if torch.cuda.is_available() and not INTERPRET:
    DEVICE = "cuda"
elif INTERPRET:
    DEVICE = "cpu"
else:
    pytest.skip("needs a CUDA device (or TRITON_INTERPRET=1)", allow_module_level=True)

from paged_cases import build_metadata, scattered_tables, slots_for

from kernels import AttentionMetadata, get_backend
from kernels.torch_ref import TorchReferenceBackend
from kernels.triton_attention import TritonBackend

TRITON = TritonBackend()
TORCH = TorchReferenceBackend()

# (dtype name, batch kind) -> {"triton": worst rel err vs fp64, "torch": same for the reference,
#                              "triton_vs_torch": worst rel difference between the two, "cases": n}
ERRORS: dict[tuple[str, str], dict[str, float]] = {}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# tolerances against the dense float64 result (inputs already rounded to the dtype)
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (2e-2, 2e-2)}

HEADS = [(4, 4), (8, 4), (8, 2), (12, 2)]  # GQA ratios 1, 2, 4, 6


# -- helpers ------------------------------------------------------------------------------------


def dense_attention(q, k, v, scale):
    """q: [qlen, H, D] (the last qlen positions), k/v: [ctx, Hkv, D] -> float64 [qlen, H, D]."""
    qlen, num_heads, _ = q.shape
    ctx, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k64) * scale
    q_pos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
    k_pos = torch.arange(ctx, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v64)


def _randint(g: torch.Generator):
    """rint(lo, hi): one integer in [lo, hi) drawn from ``g``."""
    return lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))


def rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


class Case:
    """A batch of sequences (seq_len, query_len) laid out in a paged cache on DEVICE."""

    def __init__(self, seqs, block_size, num_heads, num_kv_heads, head_dim, dtype, seed, table_pad=0, scale_mult=0.8):
        self.seqs, self.bs, self.dtype = seqs, block_size, dtype
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        g = torch.Generator().manual_seed(seed)
        self.tables, num_blocks = scattered_tables(seqs, block_size, g)
        shape = TRITON.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
        assert shape == TORCH.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
        self.cache0 = (torch.randn(shape, generator=g) * 30).to(dtype).to(DEVICE)
        self.k = [torch.randn(ctx, num_kv_heads, head_dim, generator=g).to(dtype).to(DEVICE) for ctx, _ in seqs]
        self.v = [torch.randn(ctx, num_kv_heads, head_dim, generator=g).to(dtype).to(DEVICE) for ctx, _ in seqs]
        self.q = [torch.randn(ql, num_heads, head_dim, generator=g).to(dtype).to(DEVICE) for _, ql in seqs]
        self.scale = scale_mult / math.sqrt(head_dim)
        self.table_pad = table_pad

    def slots(self, i, positions):
        return slots_for(self.tables[i], positions, self.bs)

    def metadata(self):
        md = build_metadata(self.seqs, self.tables, self.bs, self.table_pad, device=DEVICE)
        if getattr(self, "max_seq_len", None) is not None:
            md.max_seq_len = self.max_seq_len  # as a CUDA graph captured for max_model_len has it
        return md

    def run(self, backend):
        """An earlier step writes the cached prefixes, this step writes its tokens and attends."""
        cache = self.cache0.clone()
        keys, vals, slots = [], [], []
        for i, (ctx, ql) in enumerate(self.seqs):
            if ctx - ql > 0:
                keys.append(self.k[i][: ctx - ql])
                vals.append(self.v[i][: ctx - ql])
                slots += self.slots(i, range(ctx - ql))
        if slots:
            backend.write_kv(torch.cat(keys), torch.cat(vals), cache, torch.tensor(slots, dtype=torch.int64, device=DEVICE))
        md = self.metadata()
        new_k = torch.cat([k[ctx - ql :] for k, (ctx, ql) in zip(self.k, self.seqs)])
        new_v = torch.cat([v[ctx - ql :] for v, (ctx, ql) in zip(self.v, self.seqs)])
        backend.write_kv(new_k, new_v, cache, md.slot_mapping)
        query = torch.cat(self.q)
        out = backend.attend(query, cache, md, self.scale)
        assert out.shape == query.shape and out.dtype == query.dtype
        return md, out, cache

    def reference(self):
        return torch.cat([dense_attention(q, k, v, self.scale) for q, k, v in zip(self.q, self.k, self.v)])


def check(case: Case, kind: str):
    """Triton and the torch reference against dense fp64; records the errors; returns metadata."""
    if INTERPRET and case.dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter computes bf16 dots wrongly (bf16 held as uint16)")
    md, out, cache_tr = case.run(TRITON)
    _, out_ref, cache_ref = case.run(TORCH)
    assert torch.equal(cache_tr, cache_ref), "write_kv: Triton and reference caches differ"
    ref = case.reference()
    assert torch.isfinite(out.float()).all()
    e_tr, e_ref = rel_err(out, ref), rel_err(out_ref, ref)
    e_x = ((out.double() - out_ref.double()).abs().max() / ref.abs().max()).item()
    dname = {v: k for k, v in DTYPES.items()}[case.dtype]
    rec = ERRORS.setdefault((dname, kind), {"triton": 0.0, "torch": 0.0, "triton_vs_torch": 0.0, "cases": 0})
    rec["triton"] = max(rec["triton"], e_tr)
    rec["torch"] = max(rec["torch"], e_ref)
    rec["triton_vs_torch"] = max(rec["triton_vs_torch"], e_x)
    rec["cases"] += 1
    rtol, atol = TOL[case.dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    return md


def mixed_seqs(bs):
    """Fresh prompts and sequences with cached context (prefix cache / chunked prefill), odd lengths,
    plus a decode row."""
    return [
        (bs + 3, bs + 3),  # fresh, not a multiple of the block size
        (3 * bs + 5, 7),  # cached context, a partial chunk whose first row sits mid-block
        (2 * bs, 2 * bs),  # fresh, exactly two blocks
        (5, 5),  # fresh, shorter than one block
        (2 * bs + 1, 1),  # a decode row inside a mixed batch
        (4 * bs - 1, bs + 2),  # cached context, chunk crossing block boundaries
        (bs, bs - 1),  # one cached token
        (150, 37),  # cached context longer than one key tile
    ]


def long_decode_seqs(bs):
    return [(1, 1), (bs - 1, 1), (bs + 1, 1), (1000, 1), (1537, 1), (33, 1), (2100, 1), (4101, 1)]


# -- write_kv -----------------------------------------------------------------------------------


@pytest.mark.parametrize("src_dtype,cache_dtype", [
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),  # the kernel casts like Tensor.to (round to nearest even)
    (torch.float32, torch.float16),
])
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim", [(16, 2, 128), (32, 4, 64), (8, 1, 80), (16, 3, 64)])
def test_write_kv_exact(src_dtype, cache_dtype, block_size, num_kv_heads, head_dim):
    if INTERPRET and src_dtype == torch.float32 and cache_dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter truncates fp32 -> bf16; GPUs round to nearest even")
    g = torch.Generator().manual_seed(block_size * 7 + head_dim)
    num_blocks = 12
    shape = TRITON.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
    before = torch.randn(shape, generator=g).to(cache_dtype).to(DEVICE)
    n = 3 * block_size + 5
    slots = (torch.randperm((num_blocks - 1) * block_size, generator=g)[:n] + block_size).to(DEVICE)  # any order
    # keys/values as strided views of a fused qkv-like tensor, as the model produces them
    fused = torch.randn(n, 3 * num_kv_heads * head_dim + 8, generator=g).to(src_dtype).to(DEVICE)
    key = fused[:, : num_kv_heads * head_dim].view(n, num_kv_heads, head_dim)
    val = fused[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(n, num_kv_heads, head_dim)
    assert not key.is_contiguous()
    ours, ref = before.clone(), before.clone()
    TRITON.write_kv(key, val, ours, slots)
    TORCH.write_kv(key, val, ref, slots)
    assert torch.equal(ours, ref)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    written[slots] = True
    written = written.view(num_blocks, block_size)
    assert torch.equal(ours[:, ~written], before[:, ~written])  # nothing else touched
    assert torch.equal(ours[:, 0], before[:, 0])  # null block untouched
    blk, off = slots // block_size, slots % block_size
    assert torch.equal(ours[0, blk, off], key.to(cache_dtype))
    assert torch.equal(ours[1, blk, off], val.to(cache_dtype))


def test_write_kv_no_tokens():
    cache = torch.zeros(TRITON.kv_cache_shape(2, 16, 2, 64), dtype=torch.bfloat16, device=DEVICE)
    empty = torch.empty(0, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    TRITON.write_kv(empty, empty, cache, torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert not cache.any()


# -- attention vs the reference -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_mixed_batch(block_size, num_heads, num_kv_heads, head_dim, dtype):
    seed = block_size * 1000 + num_heads * 10 + head_dim + len(dtype)
    case = Case(mixed_seqs(block_size), block_size, num_heads, num_kv_heads, head_dim, DTYPES[dtype], seed=seed)
    md = check(case, "mixed (prefix-cached + fresh + decode row)")
    assert not md.is_decode_only


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(12, 2, 128), (8, 4, 64), (16, 16, 80)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_leading_decodes_then_prefills(block_size, num_heads, num_kv_heads, head_dim, dtype):
    """A busy mixed step in the scheduler's order: running requests' decodes first (these go to
    the decode kernel), then fresh prompts and chunks, with a one-token row among them too."""
    bs = block_size
    seqs = [(1, 1), (bs + 1, 1), (300, 1), (2 * bs, 1), (1029, 1),  # decodes
            (298, 298), (5, 5), (700, 129), (3 * bs + 1, 1), (8 * bs + 3, 40)]
    seed = block_size * 7 + num_heads + head_dim + len(dtype)
    case = Case(seqs, block_size, num_heads, num_kv_heads, head_dim, DTYPES[dtype], seed=seed)
    md = check(case, "mixed, leading decodes (split to the decode kernel)")
    decodes, rest = md.split_decodes()
    assert decodes.num_seqs == 5 and decodes.max_query_len == 1 and decodes.max_seq_len == 1029
    assert rest.num_seqs == 5 and rest.query_start_loc_cpu[0] == 5


@pytest.mark.parametrize("seed", range(6))
def test_random_leading_decodes(seed):
    """Random mixed steps that start with a random number of decode rows."""
    g = torch.Generator().manual_seed(3000 + seed)
    rint = _randint(g)
    bs = [8, 16, 32][seed % 3]
    num_heads, num_kv_heads = HEADS[seed % len(HEADS)]
    seqs = [(rint(1, 30 * bs), 1) for _ in range(rint(1, 40))]
    for _ in range(rint(1, 6)):
        ctx = rint(2, 30 * bs)
        seqs.append((ctx, ctx if rint(0, 2) else rint(1, ctx + 1)))
    dtype = [torch.bfloat16, torch.float16][seed % 2]
    case = Case(seqs, bs, num_heads, num_kv_heads, [64, 128][(seed // 2) % 2], dtype, seed=seed)
    check(case, "mixed, leading decodes (split to the decode kernel)")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_long_context(block_size, num_heads, num_kv_heads, head_dim, dtype):
    """Few sequences, contexts up to 4101 tokens: the split-K path."""
    seed = block_size * 999 + num_heads * 10 + head_dim + len(dtype)
    case = Case(long_decode_seqs(block_size), block_size, num_heads, num_kv_heads, head_dim, DTYPES[dtype], seed=seed)
    md = check(case, "decode, long contexts (split-K)")
    assert md.is_decode_only
    splits = TRITON.num_decode_splits(md.num_seqs, num_kv_heads, md.max_seq_len, torch.device(DEVICE))
    assert DEVICE == "cpu" or splits > 1


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("num_heads,num_kv_heads,block_size", [(12, 2, 16), (8, 4, 32)])
@pytest.mark.parametrize("grid_len", [4101, 32768])
def test_decode_grid_sized_for_max_model_len(grid_len, num_heads, num_kv_heads, block_size, dtype):
    """The decode graph's metadata says max_seq_len = max_model_len: the split count comes from
    that, and each sequence deals its own (much shorter) context out over the splits; the splits
    past it exit and the reduce reads only the ones written."""
    seqs = [(1, 1), (63, 1), (65, 1), (300, 1), (129, 1), (2049, 1)][: 3 if grid_len == 32768 and INTERPRET else 6]
    case = Case(seqs, block_size, num_heads, num_kv_heads, 128, DTYPES[dtype], seed=grid_len + block_size)
    case.max_seq_len = grid_len
    md = check(case, "decode, grid sized for max_model_len")
    splits = TRITON.num_decode_splits(md.num_seqs, num_kv_heads, grid_len, torch.device(DEVICE))
    assert DEVICE == "cpu" or splits > 1


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(12, 2, 128), (8, 8, 64)])
def test_decode_many_sequences(num_heads, num_kv_heads, head_dim, dtype):
    """Enough (sequence, kv head) pairs to fill the GPU: the unsplit path."""
    g = torch.Generator().manual_seed(num_heads + head_dim)
    lens = torch.randint(1, 700, (160,), generator=g).tolist()
    case = Case([(n, 1) for n in lens], 16, num_heads, num_kv_heads, head_dim, DTYPES[dtype], seed=5)
    md = check(case, "decode, 160 sequences (no split)")
    splits = TRITON.num_decode_splits(md.num_seqs, num_kv_heads, md.max_seq_len, torch.device(DEVICE))
    assert DEVICE == "cpu" or splits == 1


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads,block_size", [(12, 2, 16), (8, 4, 32), (4, 4, 64)])
def test_pure_prefill(block_size, num_heads, num_kv_heads, head_dim, dtype):
    """Fresh prompts only (query_len == seq_len), long enough for the 128-row query tiles."""
    seqs = [(700, 700), (300, 300), (129, 129), (1, 1), (64, 64)]
    case = Case(seqs, block_size, num_heads, num_kv_heads, head_dim, DTYPES[dtype], seed=block_size + head_dim)
    check(case, "pure prefill")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(12, 2, 128), (8, 2, 64)])
def test_chunked_prefill_long_prefix(num_heads, num_kv_heads, head_dim, dtype):
    """Chunks over long cached prefixes, next to decode rows with long contexts."""
    seqs = [(1200, 300), (900, 257), (2048, 512), (64, 1), (1500, 1), (333, 17)]
    case = Case(seqs, 16, num_heads, num_kv_heads, head_dim, DTYPES[dtype], seed=head_dim + 3)
    check(case, "mixed (prefix-cached + fresh + decode row)")


@pytest.mark.parametrize("kind", ["mixed", "decode"])
@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim", [(16, 8, 2, 64), (32, 12, 2, 128), (8, 4, 4, 64)])
def test_fp32(block_size, num_heads, num_kv_heads, head_dim, kind):
    seqs = mixed_seqs(block_size) if kind == "mixed" else long_decode_seqs(block_size)
    case = Case(seqs, block_size, num_heads, num_kv_heads, head_dim, torch.float32, seed=block_size + num_heads)
    check(case, "mixed (prefix-cached + fresh + decode row)" if kind == "mixed" else "decode, long contexts (split-K)")


@pytest.mark.parametrize("head_dim", [16, 32, 256, 80, 96])
def test_other_head_dims(head_dim):
    """Other powers of two, and head dims that are not powers of two (masked to the next one)."""
    for seqs, kind in ((mixed_seqs(16), "other head dims (16/32/256/80/96)"), (long_decode_seqs(16)[:6], "other head dims (16/32/256/80/96)")):
        case = Case(seqs, 16, 8, 2, head_dim, torch.bfloat16, seed=head_dim)
        check(case, kind)


@pytest.mark.parametrize("scale_mult", [0.05, 4.0])
def test_sharp_and_flat_softmax(scale_mult):
    """Large scales make the running max jump between key tiles (online-softmax rescaling)."""
    for seqs in (mixed_seqs(16), long_decode_seqs(16)):
        case = Case(seqs, 16, 12, 2, 128, torch.float16, seed=77, scale_mult=scale_mult)
        check(case, "sharp/flat softmax scale")


@pytest.mark.parametrize("block_size", [8, 16])
def test_wide_padded_block_table(block_size):
    """The runner may pad block tables wider than the longest sequence needs (pointing at block 0)."""
    for seqs in (mixed_seqs(block_size), long_decode_seqs(block_size)):
        case = Case(seqs, block_size, 8, 2, 64, torch.bfloat16, seed=3, table_pad=5)
        check(case, "padded block tables")


@pytest.mark.parametrize("seed", range(8))
def test_random_batches(seed):
    g = torch.Generator().manual_seed(2000 + seed)
    rint = _randint(g)
    bs = [8, 16, 32][seed % 3]
    num_heads, num_kv_heads = HEADS[seed % len(HEADS)]
    decode = seed % 4 == 3
    seqs = []
    for _ in range(rint(1, 12)):
        ctx = rint(1, 40 * bs)
        seqs.append((ctx, 1 if decode else (ctx if rint(0, 2) else rint(1, ctx + 1))))
    dtype = [torch.bfloat16, torch.float16][seed % 2]
    case = Case(seqs, bs, num_heads, num_kv_heads, [64, 128][(seed // 2) % 2], dtype, seed=seed)
    check(case, "random batches")


def test_noncontiguous_query_and_fp32_query_over_bf16_cache():
    """Queries as a strided view of a fused projection; a query dtype other than the cache's is
    cast to the cache dtype (as the reference does) and the output keeps the query dtype."""
    case = Case(mixed_seqs(16), 16, 12, 2, 128, torch.bfloat16, seed=9)
    md, out, _ = case.run(TRITON)
    query = torch.cat(case.q)
    fused = torch.zeros(query.shape[0], query.shape[1] * query.shape[2] + 64, dtype=query.dtype, device=DEVICE)
    fused[:, : query.shape[1] * query.shape[2]] = query.flatten(1)
    strided = fused[:, : query.shape[1] * query.shape[2]].view(query.shape)
    assert not strided.is_contiguous()
    cache = case.run(TRITON)[2]
    out2 = TRITON.attend(strided, cache, md, case.scale)
    assert torch.equal(out, out2)
    out3 = TRITON.attend(query.float(), cache, md, case.scale)
    assert out3.dtype == torch.float32
    torch.testing.assert_close(out3.double(), out.double(), rtol=1e-2, atol=1e-2)


def test_prefill_then_decode_steps():
    """One sequence prefilled in one step, then decoded token by token, as the runner drives it."""
    g = torch.Generator().manual_seed(0)
    bs, H, Hkv, D, total, prompt = 16, 12, 2, 128, 400, 333
    dtype = torch.bfloat16
    scale = D**-0.5
    table = (torch.randperm(40, generator=g)[: math.ceil(total / bs)] + 1).tolist()
    cache = torch.zeros(TRITON.kv_cache_shape(41, bs, Hkv, D), dtype=dtype, device=DEVICE)
    k = torch.randn(total, Hkv, D, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(total, Hkv, D, generator=g).to(dtype).to(DEVICE)
    q = torch.randn(total, H, D, generator=g).to(dtype).to(DEVICE)

    def md(start, end):
        tables = torch.zeros(1, len(table) + 2, dtype=torch.int32)
        tables[0, : len(table)] = torch.tensor(table, dtype=torch.int32)
        slots = [table[p // bs] * bs + p % bs for p in range(start, end)]
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
            block_tables=tables.to(DEVICE),
            query_start_loc=torch.tensor([0, end - start], dtype=torch.int32, device=DEVICE),
            seq_lens=torch.tensor([end], dtype=torch.int32, device=DEVICE),
            max_query_len=end - start,
            max_seq_len=end,
            block_size=bs,
            query_start_loc_cpu=[0, end - start],
            seq_lens_cpu=[end],
        )

    m = md(0, prompt)
    TRITON.write_kv(k[:prompt], v[:prompt], cache, m.slot_mapping)
    out = TRITON.attend(q[:prompt], cache, m, scale)
    torch.testing.assert_close(out.double(), dense_attention(q[:prompt], k[:prompt], v[:prompt], scale), rtol=2e-2, atol=2e-2)
    for p in range(prompt, total, 7):
        m = md(p, p + 1)
        TRITON.write_kv(k[p : p + 1], v[p : p + 1], cache, m.slot_mapping)
        out = TRITON.attend(q[p : p + 1], cache, m, scale)
        ref = dense_attention(q[p : p + 1], k[: p + 1], v[: p + 1], scale)
        torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
        for j in range(p + 1, min(p + 7, total)):  # fill the skipped positions
            mj = md(j, j + 1)
            TRITON.write_kv(k[j : j + 1], v[j : j + 1], cache, mj.slot_mapping)


# -- CUDA specifics -----------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA only")


@cuda_only
@pytest.mark.parametrize("seqs", [mixed_seqs(16), long_decode_seqs(16), [(300, 1)] * 64])
def test_no_host_sync_in_write_kv_and_attend(seqs):
    case = Case(seqs, 16, 12, 2, 128, torch.bfloat16, seed=1)
    md, _, cache = case.run(TRITON)  # compiles the kernels
    query = torch.cat(case.q)
    new_k = torch.cat([k[ctx - ql :] for k, (ctx, ql) in zip(case.k, case.seqs)])
    new_v = torch.cat([v[ctx - ql :] for v, (ctx, ql) in zip(case.v, case.seqs)])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        TRITON.write_kv(new_k, new_v, cache, md.slot_mapping)
        TRITON.attend(query, cache, md, case.scale)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda_only
@pytest.mark.parametrize("seqs", [long_decode_seqs(16), mixed_seqs(16)])
def test_cuda_graph_capture_and_replay(seqs):
    """write_kv + attend captured in a CUDA graph and replayed on new queries/keys."""
    case = Case(seqs, 16, 12, 2, 128, torch.bfloat16, seed=2)
    md, _, cache = case.run(TRITON)
    q = torch.cat(case.q)
    new_k = torch.cat([k[ctx - ql :] for k, (ctx, ql) in zip(case.k, case.seqs)])
    new_v = torch.cat([v[ctx - ql :] for v, (ctx, ql) in zip(case.v, case.seqs)])
    s_q, s_k, s_v = q.clone(), new_k.clone(), new_v.clone()
    graph_cache = cache.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture, as torch recommends
        TRITON.write_kv(s_k, s_v, graph_cache, md.slot_mapping)
        TRITON.attend(s_q, graph_cache, md, case.scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        TRITON.write_kv(s_k, s_v, graph_cache, md.slot_mapping)
        s_out = TRITON.attend(s_q, graph_cache, md, case.scale)
    for trial in range(2):
        s_q.copy_(torch.randn_like(q))
        s_k.copy_(torch.randn_like(new_k))
        s_v.copy_(torch.randn_like(new_v))
        graph.replay()
        eager_cache = cache.clone()
        TRITON.write_kv(s_k, s_v, eager_cache, md.slot_mapping)
        eager = TRITON.attend(s_q, eager_cache, md, case.scale)
        torch.cuda.synchronize()
        assert torch.equal(graph_cache, eager_cache)
        assert torch.equal(s_out, eager)


@cuda_only
def test_registry_prefers_triton_on_cuda():
    assert get_backend("cuda").name == "triton"
    assert isinstance(get_backend("cuda", "triton"), TritonBackend)
    assert get_backend("cuda", "torch").name == "torch"
    assert get_backend("cpu").name == "torch"


# -- report -------------------------------------------------------------------------------------


def test_zz_report_max_relative_errors():
    """Prints the worst relative errors per (dtype, batch kind) (visible with pytest -s)."""
    if not ERRORS:
        pytest.skip("no attention test ran")
    dev = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (triton interpreter)"
    lines = [
        f"Triton backend vs dense float64 attention on {dev} (torch {torch.__version__}, triton {triton.__version__})",
        "max rel err = max|out - ref64| / max|ref64| over all cases of the row",
        "",
        "| dtype | batch | cases | triton vs fp64 | torch ref vs fp64 | triton vs torch ref |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (dname, kind), r in sorted(ERRORS.items()):
        lines.append(f"| {dname} | {kind} | {r['cases']} | {r['triton']:.2e} | {r['torch']:.2e} | {r['triton_vs_torch']:.2e} |")
    print("\n" + "\n".join(lines))
    path = os.environ.get("VLMSERVE_KERNEL_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(
                {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
                 "rows": [{"dtype": d, "batch": k, **r} for (d, k), r in sorted(ERRORS.items())]},
                f, indent=2,
            )
    for (dname, _), r in ERRORS.items():
        if dname == "fp32":
            assert r["triton"] < 1e-4
