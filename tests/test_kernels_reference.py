"""The torch reference attention backend against a naive dense float64 attention, and the
backend registry.

Every case uses scattered, shuffled block ids (never block 0 for real data), caches prefilled
with finite garbage (so reading an unmasked wrong slot shows up), a non-default softmax scale,
and lengths that are not multiples of the block size."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from paged_cases import build_metadata, scattered_tables, slots_for

import kernels
from kernels import AttentionMetadata, get_backend, register_backend
from kernels import registry as kreg
from kernels.torch_ref import TorchReferenceBackend

MAX_REL_ERR: dict[str, float] = {}  # filled by the tests, printed at the end (pytest -s)


# -- helpers ------------------------------------------------------------------------------------


def naive_attention(q, k, v, scale):
    """q: [qlen, H, D] (the last qlen positions), k/v: [ctx, Hkv, D]; float64, causal."""
    qlen, num_heads, _ = q.shape
    ctx, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    q64, k64, v64 = q.double(), k.double(), v.double()
    k64 = k64.repeat_interleave(group, dim=1)  # head h uses kv head h // group
    v64 = v64.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q64, k64) * scale
    q_pos = torch.arange(ctx - qlen, ctx)[:, None]
    k_pos = torch.arange(ctx)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v64)


class Case:
    """A batch of sequences (seq_len, query_len) laid out in a paged cache."""

    def __init__(self, seqs, block_size, num_heads, num_kv_heads, head_dim, dtype, seed, table_pad=0):
        self.backend = get_backend("cpu")
        self.seqs = seqs
        self.bs = block_size
        self.dtype = dtype
        g = torch.Generator().manual_seed(seed)
        self.tables, num_blocks = scattered_tables(seqs, block_size, g)
        shape = self.backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
        assert shape == (2, num_blocks, block_size, num_kv_heads, head_dim)
        # finite garbage everywhere, including block 0 and the tails of partial blocks
        self.kv_cache = (torch.randn(shape, generator=g) * 30).to(dtype)
        self.k = [torch.randn(ctx, num_kv_heads, head_dim, generator=g).to(dtype) for ctx, _ in seqs]
        self.v = [torch.randn(ctx, num_kv_heads, head_dim, generator=g).to(dtype) for ctx, _ in seqs]
        self.q = [torch.randn(ql, num_heads, head_dim, generator=g).to(dtype) for _, ql in seqs]
        self.scale = 0.8 / math.sqrt(head_dim)  # not SDPA's default: the scale must be passed on
        self.table_pad = table_pad

    def slots(self, i, positions):
        return slots_for(self.tables[i], positions, self.bs)

    def write_prefixes(self):
        """An earlier step: the cached context (all but the last query_len tokens of each sequence)."""
        keys, vals, slots = [], [], []
        for i, (ctx, ql) in enumerate(self.seqs):
            if ctx - ql > 0:
                keys.append(self.k[i][: ctx - ql])
                vals.append(self.v[i][: ctx - ql])
                slots += self.slots(i, range(ctx - ql))
        if slots:
            self.backend.write_kv(torch.cat(keys), torch.cat(vals), self.kv_cache, torch.tensor(slots, dtype=torch.int64))

    def metadata(self):
        return build_metadata(self.seqs, self.tables, self.bs, self.table_pad)

    def run(self):
        self.write_prefixes()
        md = self.metadata()
        new_k = torch.cat([k[ctx - ql :] for k, (ctx, ql) in zip(self.k, self.seqs)])
        new_v = torch.cat([v[ctx - ql :] for v, (ctx, ql) in zip(self.v, self.seqs)])
        self.backend.write_kv(new_k, new_v, self.kv_cache, md.slot_mapping)
        query = torch.cat(self.q)
        out = self.backend.attend(query, self.kv_cache, md, self.scale)
        assert out.shape == query.shape and out.dtype == query.dtype
        return md, out

    def reference(self):
        return torch.cat([naive_attention(q, k, v, self.scale) for q, k, v in zip(self.q, self.k, self.v)])


def check(case: Case, tag: str):
    md, out = case.run()
    ref = case.reference()
    rel = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    MAX_REL_ERR[tag] = max(MAX_REL_ERR.get(tag, 0.0), rel)
    if case.dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    else:  # bf16 inputs (the reference sees the same rounded inputs), bf16 softmax/matmul
        torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    return md, out


def mixed_seqs(bs):
    """Fresh prompts and sequences with cached context, odd lengths, plus a decode row."""
    return [
        (bs + 3, bs + 3),  # fresh, not a multiple of the block size
        (3 * bs + 5, 7),  # cached context, a partial chunk whose first row sits mid-block
        (2 * bs, 2 * bs),  # fresh, exactly two blocks
        (5, 5),  # fresh, shorter than one block
        (2 * bs + 1, 1),  # a decode row inside a mixed batch
        (4 * bs - 1, bs + 2),  # cached context, chunk crossing block boundaries
        (bs, bs - 1),  # one cached token
    ]


def decode_seqs(bs):
    return [(1, 1), (bs - 1, 1), (bs, 1), (bs + 1, 1), (3 * bs + 5, 1), (2 * bs + 7, 1)]


HEADS = [(4, 4), (8, 4), (4, 1), (8, 2)]  # GQA ratios 1, 2, 4 (num_heads 4 or 8)
# every block size with every head layout, head_dim alternating so that each block size and
# each GQA ratio is seen with both head dims (a full product would be slow on a shared CPU)
SHAPES = [
    (bs, h, kvh, (16, 64)[(i + j) % 2])
    for i, bs in enumerate([8, 16, 32])
    for j, (h, kvh) in enumerate(HEADS)
]


# -- attention against the dense reference ------------------------------------------------------


@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim", SHAPES)
def test_mixed_batch_fp32(block_size, num_heads, num_kv_heads, head_dim):
    case = Case(mixed_seqs(block_size), block_size, num_heads, num_kv_heads, head_dim, torch.float32, seed=block_size + head_dim)
    md, _ = check(case, "fp32 mixed")
    assert not md.is_decode_only


@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim", SHAPES)
def test_decode_only_batch_fp32(block_size, num_heads, num_kv_heads, head_dim):
    case = Case(decode_seqs(block_size), block_size, num_heads, num_kv_heads, head_dim, torch.float32, seed=7 * block_size + head_dim)
    md, _ = check(case, "fp32 decode")
    assert md.is_decode_only


@pytest.mark.parametrize("block_size", [8, 16])
def test_decode_only_with_wide_padded_block_table(block_size):
    """The runner may pad block tables wider than the longest sequence needs (pointing at block 0)."""
    case = Case(decode_seqs(block_size), block_size, 8, 2, 16, torch.float32, seed=3, table_pad=5)
    check(case, "fp32 decode")
    case = Case(mixed_seqs(block_size), block_size, 8, 2, 16, torch.float32, seed=4, table_pad=5)
    check(case, "fp32 mixed")


@pytest.mark.parametrize("seed", range(6))
def test_random_batches_fp32(seed):
    g = torch.Generator().manual_seed(1000 + seed)

    def rint(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    bs = [8, 16, 32][seed % 3]
    num_heads, num_kv_heads = HEADS[seed % len(HEADS)]
    seqs = []
    for _ in range(rint(1, 7)):
        ctx = rint(1, 5 * bs)
        seqs.append((ctx, ctx if rint(0, 2) else rint(1, ctx + 1)))
    case = Case(seqs, bs, num_heads, num_kv_heads, [16, 64][seed % 2], torch.float32, seed=seed)
    check(case, "fp32 random")


def test_single_sequence_prefill_and_single_decode():
    check(Case([(37, 37)], 16, 4, 2, 16, torch.float32, seed=11), "fp32 mixed")
    check(Case([(37, 1)], 16, 4, 2, 16, torch.float32, seed=12), "fp32 decode")


@pytest.mark.parametrize("block_size,num_heads,num_kv_heads", [(8, 4, 4), (16, 8, 4), (32, 8, 2)])
def test_bfloat16(block_size, num_heads, num_kv_heads):
    for seqs, tag in ((mixed_seqs(block_size), "bf16 mixed"), (decode_seqs(block_size), "bf16 decode")):
        case = Case(seqs, block_size, num_heads, num_kv_heads, 64, torch.bfloat16, seed=block_size)
        check(case, tag)


def test_prefill_then_decode_steps_match_reference():
    """A sequence prefilled in one step, then decoded token by token through the fast path."""
    torch.manual_seed(0)
    backend = get_backend("cpu")
    bs, H, Hkv, D, total = 8, 8, 2, 16, 29
    scale = D**-0.5
    table = [9, 3, 14, 6]  # shuffled, non-contiguous
    cache = torch.randn(backend.kv_cache_shape(16, bs, Hkv, D)) * 30
    k = torch.randn(total, Hkv, D)
    v = torch.randn(total, Hkv, D)
    q = torch.randn(total, H, D)

    def slot(p):
        return table[p // bs] * bs + p % bs

    def md(start, end):
        tables = torch.zeros(1, 6, dtype=torch.int32)
        tables[0, : len(table)] = torch.tensor(table, dtype=torch.int32)
        return AttentionMetadata(
            slot_mapping=torch.tensor([slot(p) for p in range(start, end)], dtype=torch.int64),
            block_tables=tables,
            query_start_loc=torch.tensor([0, end - start], dtype=torch.int32),
            seq_lens=torch.tensor([end], dtype=torch.int32),
            max_query_len=end - start,
            max_seq_len=end,
            block_size=bs,
            query_start_loc_cpu=[0, end - start],
            seq_lens_cpu=[end],
        )

    prompt = 19
    m = md(0, prompt)
    backend.write_kv(k[:prompt], v[:prompt], cache, m.slot_mapping)
    out = backend.attend(q[:prompt], cache, m, scale)
    torch.testing.assert_close(out.double(), naive_attention(q[:prompt], k[:prompt], v[:prompt], scale), rtol=1e-4, atol=1e-5)
    for p in range(prompt, total):
        m = md(p, p + 1)
        assert m.is_decode_only
        backend.write_kv(k[p : p + 1], v[p : p + 1], cache, m.slot_mapping)
        out = backend.attend(q[p : p + 1], cache, m, scale)
        ref = naive_attention(q[p : p + 1], k[: p + 1], v[: p + 1], scale)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


# -- write_kv -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_puts_each_token_at_its_slot(dtype):
    backend = get_backend("cpu")
    g = torch.Generator().manual_seed(5)
    num_blocks, bs, Hkv, D = 10, 8, 2, 16
    cache = torch.randn(backend.kv_cache_shape(num_blocks, bs, Hkv, D), generator=g).to(dtype)
    before = cache.clone()
    n = 21
    slots = torch.randperm((num_blocks - 1) * bs, generator=g)[:n] + bs  # never block 0, any order
    key = torch.randn(n, Hkv, D, generator=g)  # fp32 input: the backend casts to the cache dtype
    val = torch.randn(n, Hkv, D, generator=g)
    backend.write_kv(key, val, cache, slots)
    for t in range(n):
        blk, off = divmod(int(slots[t]), bs)
        torch.testing.assert_close(cache[0, blk, off], key[t].to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(cache[1, blk, off], val[t].to(dtype), rtol=0, atol=0)
    written = torch.zeros(num_blocks * bs, dtype=torch.bool)
    written[slots] = True
    written = written.view(num_blocks, bs)
    assert torch.equal(cache[:, ~written], before[:, ~written])  # nothing else touched
    assert torch.equal(cache[:, 0], before[:, 0])  # null block untouched


def test_write_kv_through_case_layout():
    """After a full Case run the cache holds every token of every sequence at its slot."""
    case = Case(mixed_seqs(16), 16, 8, 2, 16, torch.float32, seed=21)
    case.run()
    for i, (ctx, _) in enumerate(case.seqs):
        for p, s in enumerate(case.slots(i, range(ctx))):
            blk, off = divmod(s, case.bs)
            assert blk != 0
            assert torch.equal(case.kv_cache[0, blk, off], case.k[i][p])
            assert torch.equal(case.kv_cache[1, blk, off], case.v[i][p])


# -- registry -----------------------------------------------------------------------------------


@pytest.fixture
def clean_registry():
    saved = (dict(kreg._REGISTRY), {k: list(v) for k, v in kreg._PREFERENCE.items()}, dict(kreg._INSTANCES))
    yield
    kreg._REGISTRY.clear()
    kreg._REGISTRY.update(saved[0])
    kreg._PREFERENCE.clear()
    kreg._PREFERENCE.update(saved[1])
    kreg._INSTANCES.clear()
    kreg._INSTANCES.update(saved[2])


@pytest.mark.parametrize("qlens,leading", [
    ([1, 1, 1], 3), ([5, 1, 1], 0), ([1, 1, 7, 1, 3], 2), ([1], 1), ([4], 0), ([1, 2], 1), ([1] * 9 + [2], 9),
])
def test_split_decodes(qlens, leading):
    """The leading one-token sequences and the rest, each as metadata that indexes the same query
    rows (absolute query_start_loc) with its own block tables and lengths; checked against a
    plain scan of the query lengths."""
    seqs = [(ql + 3 * i, ql) for i, ql in enumerate(qlens)]
    tables, _ = scattered_tables(seqs, 8, torch.Generator().manual_seed(len(qlens)))
    md = build_metadata(seqs, tables, 8)
    scan = next((i for i, ql in enumerate(qlens) if ql != 1), len(qlens))
    assert md.num_leading_decodes() == scan == leading
    decodes, rest = md.split_decodes()
    assert md.split_decodes() is md._split  # made once, shared by every layer
    if leading == 0:
        assert decodes is None and rest is md
    elif leading == len(qlens):
        assert decodes is md and rest is None
    else:
        assert decodes.num_seqs == leading and rest.num_seqs == len(qlens) - leading
        assert decodes.query_start_loc.tolist() == list(range(leading + 1)) == decodes.query_start_loc_cpu
        assert rest.query_start_loc.tolist() == md.query_start_loc_cpu[leading:] == rest.query_start_loc_cpu
        assert torch.equal(rest.block_tables, md.block_tables[leading:])
        assert rest.seq_lens.tolist() == [c for c, _ in seqs[leading:]] == rest.seq_lens_cpu
        assert decodes.max_seq_len == max(c for c, _ in seqs[:leading]) and decodes.max_query_len == 1
        assert rest.max_query_len == max(qlens)


def test_get_backend_cpu_is_torch_reference():
    b = get_backend("cpu")
    assert isinstance(b, TorchReferenceBackend) and b.name == "torch"
    assert get_backend("cpu", "torch") is b  # one shared instance
    assert "torch" in kernels.available_backends()


def test_unknown_backend_name_raises():
    with pytest.raises(ValueError, match="attention_backend"):
        get_backend("cpu", "no-such-backend")


def test_backend_for_wrong_device_type_raises(clean_registry):
    register_backend("cuda_only_test", "kernels.torch_ref", "TorchReferenceBackend", ("cuda",))
    with pytest.raises(ValueError, match="attention_backend"):
        get_backend("cpu", "cuda_only_test")


def test_unimportable_preferred_backend_falls_back(clean_registry, tmp_path, monkeypatch):
    # a module that does not exist at all
    register_backend("ghost_test", "vlmserve_no_such_module_xyz", "Ghost", ("cpu",), preferred=True)
    assert kreg._PREFERENCE["cpu"][0] == "ghost_test"
    assert get_backend("cpu").name == "torch"
    # a module that exists but whose own import fails (a missing optional dependency)
    (tmp_path / "vlmserve_broken_backend_test.py").write_text(
        "import vlmserve_missing_dependency_xyz\nclass Broken: ...\n"
    )
    # and one whose native library fails to load (a plain ImportError, not ModuleNotFoundError)
    (tmp_path / "vlmserve_broken_so_backend_test.py").write_text(
        "raise ImportError('libfake_kernels.so: cannot open shared object file')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    register_backend("broken_test", "vlmserve_broken_backend_test", "Broken", ("cpu",), preferred=True)
    assert kreg._PREFERENCE["cpu"][:2] == ["broken_test", "ghost_test"]
    b = get_backend("cpu")
    assert isinstance(b, TorchReferenceBackend)
    register_backend("broken_so_test", "vlmserve_broken_so_backend_test", "Broken", ("cpu",), preferred=True)
    assert get_backend("cpu") is b
    for name in ("ghost_test", "broken_test", "broken_so_test"):
        assert name not in kreg._INSTANCES
    sys.modules.pop("vlmserve_broken_backend_test", None)
    sys.modules.pop("vlmserve_broken_so_backend_test", None)


def test_preferred_importable_backend_wins(clean_registry):
    class Dummy(TorchReferenceBackend):
        name = "dummy"

    mod = type(sys)("vlmserve_dummy_backend_test")
    mod.Dummy = Dummy
    sys.modules["vlmserve_dummy_backend_test"] = mod
    try:
        register_backend("dummy_test", "vlmserve_dummy_backend_test", "Dummy", ("cpu",), preferred=True)
        assert get_backend("cpu").name == "dummy"
        register_backend("dummy2_test", "vlmserve_dummy_backend_test", "Dummy", ("cpu",))  # appended last
        assert kreg._PREFERENCE["cpu"][-1] == "dummy2_test"
    finally:
        del sys.modules["vlmserve_dummy_backend_test"]


def test_zy_registry_restored_after_registry_tests():
    names = ("ghost_test", "broken_test", "broken_so_test", "dummy_test", "dummy2_test", "cuda_only_test")
    assert not set(names) & set(kreg._REGISTRY)
    assert all(not set(names) & set(v) for v in kreg._PREFERENCE.values())
    assert kreg._PREFERENCE["cpu"][0] == "torch"


def test_zz_report_max_relative_error():
    """Prints the worst relative error seen per category (visible with pytest -s)."""
    for tag, err in sorted(MAX_REL_ERR.items()):
        print(f"max relative error [{tag}]: {err:.3e}")
        if tag.startswith("fp32"):
            assert err < 1e-4
