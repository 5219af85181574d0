"""Triton paged attention for CUDA: KV-cache writes, varlen causal prefill over paged context, and
split-K (flash-decoding) decode.

Same KV layout as the torch reference, so the two can be swapped freely:
``[2, num_blocks, block_size, num_kv_heads, head_dim]``, index 0 keys and 1 values; block 0 is the
null block that padded tokens may write to and padded block-table entries point at.

Kernels:
  * ``_write_kv_kernel``: one program per new token copies its keys and values (all kv heads) to
    ``slot_mapping[token]``, casting to the cache dtype (round to nearest even, like ``Tensor.to``).
  * ``_prefill_kernel``: one program per (query tile of BLOCK_M rows, sequence, query head). Query
    row ``j`` of a sequence with ``seq_len`` L and ``query_len`` Q sits at position ``L - Q + j`` and
    sees keys ``0..L-Q+j``; keys are gathered block by block through ``block_tables`` (so prefix-
    cached context is read like any other). Online softmax in base 2, fp32 accumulation. Key tiles
    that every row of the query tile sees in full run without the causal mask.
  * ``_decode_kernel`` + ``_decode_reduce_kernel``: every query_len is 1. One program per
    (sequence, kv head, context split) handles all query heads of the GQA group at once (each K/V
    tile is read once per group), so the tensor-core dot has the group (padded to 16) as its M.
    When there are too few (sequence, kv head) pairs to fill the GPU, the context is split and the
    partial results (unnormalised accumulator, running max, running sum) are merged by a second
    kernel; with one split the first kernel writes the output directly. The number of splits is a
    launch constant (so a graph captured once serves every length), but each sequence deals its
    own key tiles out over them: a short context runs a few one-tile splits, the rest exit.

No host synchronisation: grid sizes come from the metadata's host-side fields (``max_query_len``,
``max_seq_len``, ``num_seqs``), and everything else is read on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import fused_ops
from kernels.backend import AttentionBackend, AttentionMetadata
from kernels.triton_fused import _neox_rotate

_LOG2E = 1.4426950408889634
_NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: exp2(-inf - -inf) would be NaN


# -- KV-cache write --------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    kv_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kv,
    stride_cb,
    stride_cs,
    stride_ch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    k_cache_ptr = kv_cache_ptr
    v_cache_ptr = kv_cache_ptr + stride_kv  # kv_cache[1]
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot < 0:  # vLLM-style padding marker; our runner uses block 0 instead, both are safe
        return
    blk = slot // PAGE_SIZE
    off = slot % PAGE_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(key_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = blk * stride_cb + off * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_write_kv_kernel(
    qk_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    kv_cache_ptr,
    slot_mapping_ptr,
    num_heads,
    num_kv_heads,
    stride_xt,
    stride_xh,
    stride_vt,
    stride_vh,
    stride_ct,
    stride_st,
    stride_ot,
    stride_oh,
    stride_kv,
    stride_cb,
    stride_cs,
    stride_ch,
    HALF: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_KV: tl.constexpr,
):
    """One program per token: rotate its q and k heads (kernels.triton_fused's rotary roundings),
    store q to ``q_out`` and k, v to the cache slot (skipped for a negative slot)."""
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    n_qk = num_heads + num_kv_heads
    mask = (heads < n_qk)[:, None] & d_mask[None, :]
    dtype = q_out_ptr.dtype.element_ty
    xp = qk_ptr + tok * stride_xt + heads[:, None] * stride_xh + d[None, :]
    o1, o2 = _neox_rotate(xp, cos_ptr + tok * stride_ct + d, sin_ptr + tok * stride_st + d, mask, d_mask, HALF, dtype)
    o1 = o1.to(dtype)
    o2 = o2.to(dtype)
    # queries: heads [0, num_heads)
    q_mask = (heads < num_heads)[:, None] & d_mask[None, :]
    qp = q_out_ptr + tok * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(qp, o1, mask=q_mask)
    tl.store(qp + HALF, o2, mask=q_mask)
    # keys: heads [num_heads, num_heads + num_kv_heads), and the values, to the cache slot
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    blk = slot // PAGE_SIZE
    off = slot % PAGE_SIZE
    ok = slot >= 0
    base = blk * stride_cb + off * stride_cs
    kv_head = heads - num_heads
    k_mask = ok & (heads >= num_heads)[:, None] & mask
    kp = kv_cache_ptr + base + kv_head[:, None] * stride_ch + d[None, :]
    tl.store(kp, o1, mask=k_mask)
    tl.store(kp + HALF, o2, mask=k_mask)
    hv = tl.arange(0, BLOCK_KV)
    dv = tl.arange(0, 2 * BLOCK_HALF)
    v_mask = ok & (hv < num_kv_heads)[:, None] & (dv < 2 * HALF)[None, :]
    v = tl.load(v_ptr + tok * stride_vt + hv[:, None] * stride_vh + dv[None, :], mask=v_mask)
    tl.store(kv_cache_ptr + stride_kv + base + hv[:, None] * stride_ch + dv[None, :], v, mask=v_mask)


# -- shared inner step -----------------------------------------------------------------------------


@triton.jit
def _attn_tile(
    acc,
    l_i,
    m_i,
    q,
    k_cache_ptr,
    v_cache_ptr,
    bt_row_ptr,
    start_n,
    kv_end,
    q_pos,
    kv_head,
    qk_scale,
    stride_kb,
    stride_ks,
    stride_kh,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BOUNDS: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One key tile [start_n, start_n + BLOCK_N) of online softmax.

    BOUNDS: keys at or past ``kv_end`` are masked out (and not read). CAUSAL: key n is masked for
    the rows whose ``q_pos`` is below n. q: [M, BLOCK_D] in the cache dtype; acc: [M, BLOCK_D] fp32.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if BOUNDS:
        n_mask = offs_n < kv_end
    else:
        n_mask = offs_n >= 0  # all true; lets the loads below stay uniform
    block_ids = tl.load(bt_row_ptr + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
    in_page = (offs_n % PAGE_SIZE).to(tl.int64)
    k_off = block_ids * stride_kb + in_page * stride_ks + kv_head * stride_kh  # [BLOCK_N]
    v_off = k_off  # keys and values share one layout
    if BLOCK_D == HEAD_DIM:
        k_mask = n_mask[None, :]
        v_mask = n_mask[:, None]
    else:
        k_mask = n_mask[None, :] & (offs_d[:, None] < HEAD_DIM)
        v_mask = n_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_cache_ptr + k_off[None, :] + offs_d[:, None], mask=k_mask, other=0.0)  # [D, N]
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * qk_scale  # log2 domain
    if CAUSAL:
        valid = offs_n[None, :] <= q_pos[:, None]
        if BOUNDS:
            valid = valid & n_mask[None, :]
        s = tl.where(valid, s, float("-inf"))
    elif BOUNDS:
        s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=v_mask, other=0.0)  # [N, D]
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


# -- prefill / mixed batches -----------------------------------------------------------------------


# stride_bt (the block table's width) changes with the batch. Specialised on it, Triton compiled the
# kernel again for each new value class (1, a multiple of 16, other) while requests waited: about 1 s
# each on an H200, a third of the engine core's time in a profile under serving load.
@triton.jit(do_not_specialize=['stride_bt'])
def _prefill_kernel(
    q_ptr,
    kv_cache_ptr,
    o_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    qk_scale,
    group,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kv,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_bt,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    q_tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    k_cache_ptr = kv_cache_ptr
    v_cache_ptr = kv_cache_ptr + stride_kv
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # tokens cached before this step's chunk
    kv_head = head // group

    offs_m = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    q_rows = (q_start + offs_m).to(tl.int64)
    q_mask = m_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)
    q_pos = ctx_len + offs_m

    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt

    # Keys below the tile's first position are seen by every row of the tile: no mask needed.
    first_pos = ctx_len + q_tile * BLOCK_M
    full_end = (first_pos // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_M)
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(
            acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row_ptr, start_n, kv_end, q_pos, kv_head, qk_scale,
            stride_kb, stride_ks, stride_kh,
            PAGE_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N, False, False, IEEE,
        )
    for start_n in range(full_end, kv_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(
            acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row_ptr, start_n, kv_end, q_pos, kv_head, qk_scale,
            stride_kb, stride_ks, stride_kh,
            PAGE_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N, True, True, IEEE,
        )

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(o_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=q_mask)


# -- decode (every query_len == 1) -----------------------------------------------------------------


# Not specialised on the batch-dependent stride_bt (see _prefill_kernel).
@triton.jit(do_not_specialize=['stride_bt'])
def _decode_kernel(
    q_ptr,
    kv_cache_ptr,
    o_ptr,
    part_acc_ptr,
    part_ml_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    qk_scale,
    group,
    num_heads,
    num_splits,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kv,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_bt,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    k_cache_ptr = kv_cache_ptr
    v_cache_ptr = kv_cache_ptr + stride_kv
    seq_len = tl.load(seq_lens_ptr + seq)
    row = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    # The context is dealt out in whole key tiles over the splits, sized from this sequence's own
    # length (not the grid's): short sequences use few splits of one tile each, and a CUDA graph
    # captured for max_model_len costs only empty programs, which the reduce never reads.
    partition = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits) * BLOCK_N
    kv_start = split * partition
    if SPLIT and kv_start >= seq_len:
        return
    kv_end = tl.minimum(kv_start + partition, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + offs_g
    g_mask = offs_g < group
    q_mask = g_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_G], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    bt_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start_n in range(kv_start, kv_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(
            acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row_ptr, start_n, kv_end, offs_g, kv_head, qk_scale,
            stride_kb, stride_ks, stride_kh,
            PAGE_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N, True, False, IEEE,
        )

    if SPLIT:
        # partials: acc [num_seqs, num_heads, num_splits, BLOCK_D], (m, l) [2, num_seqs, num_heads, num_splits]
        base = (seq.to(tl.int64) * num_heads + heads) * num_splits + split  # [BLOCK_G]
        tl.store(part_acc_ptr + base[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_mask[:, None])
        ml_stride = tl.num_programs(0).to(tl.int64) * num_heads * num_splits
        tl.store(part_ml_ptr + base, m_i, mask=g_mask)
        tl.store(part_ml_ptr + ml_stride + base, l_i, mask=g_mask)
    else:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_i[:, None]
        tl.store(o_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _decode_reduce_kernel(
    o_ptr,
    part_acc_ptr,
    part_ml_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    num_heads,
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    # the splits _decode_kernel wrote: as many as hold at least one key
    tiles = tl.maximum(tl.cdiv(tl.load(seq_lens_ptr + seq), BLOCK_N), 1)
    active = tl.cdiv(tiles, tl.cdiv(tiles, num_splits))
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < active
    base = (seq.to(tl.int64) * num_heads + head) * num_splits + offs_s  # [BLOCK_S]
    ml_stride = tl.num_programs(0).to(tl.int64) * num_heads * num_splits
    m = tl.load(part_ml_ptr + base, mask=s_mask, other=_NEG_BIG)
    l = tl.load(part_ml_ptr + ml_stride + base, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - m_max)
    w = tl.where(s_mask, w, 0.0)
    acc = tl.load(part_acc_ptr + base[:, None] * BLOCK_D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l * w, 0)
    den = tl.where(den == 0.0, 1.0, den)
    out = num / den
    tl.store(o_ptr + row * stride_ot + head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


# -- backend ---------------------------------------------------------------------------------------


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


# (num_kv_heads, head_dim) -> (BLOCK_H, BLOCK_D, num_warps) of the KV-cache write
_WRITE_CFG: dict[tuple[int, int], tuple[int, int, int]] = {}


class TritonBackend(AttentionBackend):
    """Triton paged attention; same cache layout as ``TorchReferenceBackend``."""

    name = "triton"

    # decode: keys per tile (a split holds a whole number of tiles), the most splits, and the
    # launch shape (bench/decode_attention_sweep.py measures the alternatives)
    DECODE_BLOCK_N = 64
    MAX_SPLITS = 128
    DECODE_WARPS = 4
    DECODE_STAGES = 2

    def __init__(self) -> None:
        super().__init__()
        # (num_seqs, num_kv_heads, max_seq_len, device, block_n) -> num_splits
        self._splits_cache: dict[tuple, int] = {}

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    # -- write ----------------------------------------------------------------------------------
    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        # Called once per layer per step with the GPU otherwise idle: keep the host path short
        # (no cache slicing, launch constants cached per shape).
        num_tokens, num_kv_heads, head_dim = key.shape
        if num_tokens == 0:
            return
        if key.stride(-1) != 1:
            key = key.contiguous()
        if value.stride(-1) != 1:
            value = value.contiguous()
        cs = kv_cache.stride()
        assert cs[-1] == 1
        shape = kv_cache.shape
        cfg = _WRITE_CFG.get((num_kv_heads, head_dim))
        if cfg is None:
            cfg = _WRITE_CFG[(num_kv_heads, head_dim)] = (
                triton.next_power_of_2(num_kv_heads),
                triton.next_power_of_2(head_dim),
                4 if num_kv_heads * head_dim >= 1024 else 2,
            )
        ks, vs = key.stride(), value.stride()
        _write_kv_kernel[(num_tokens,)](
            key, value, kv_cache, slot_mapping,
            ks[0], ks[1], vs[0], vs[1],
            cs[0], cs[1], cs[2], cs[3],
            NUM_KV_HEADS=num_kv_heads,
            HEAD_DIM=head_dim,
            PAGE_SIZE=shape[2],
            BLOCK_H=cfg[0],
            BLOCK_D=cfg[1],
            num_warps=cfg[2],
        )

    def rotary_write_kv(
        self,
        qk: torch.Tensor,
        value: torch.Tensor,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_heads: int,
    ) -> torch.Tensor:
        """One kernel for the rotary and the KV write of a layer (see AttentionBackend), bit for
        bit the rotary of ``kernels.triton_fused`` followed by ``write_kv``. Only where the fused
        kernels are enabled, in fp16 / bf16 with one dtype throughout and per-token tables;
        anything else takes the two-kernel path."""
        n, n_qk, head_dim = qk.shape
        num_kv_heads = n_qk - num_heads
        dtype = qk.dtype
        if not (
            fused_ops.is_enabled()
            and dtype in (torch.float16, torch.bfloat16)
            and kv_cache.dtype == dtype and value.dtype == dtype and cos.dtype == dtype and sin_signed.dtype == dtype
            and head_dim % 2 == 0
            and cos.shape == sin_signed.shape == (n, 1, head_dim)
            and cos.stride(-1) == 1 and sin_signed.stride(-1) == 1
            and qk.stride(-1) == 1 and value.stride(-1) == 1
            and value.shape == (n, num_kv_heads, head_dim)
            and kv_cache.stride(-1) == 1
        ):
            return super().rotary_write_kv(qk, value, cos, sin_signed, kv_cache, slot_mapping, num_heads)
        q = torch.empty((n, num_heads, head_dim), dtype=dtype, device=qk.device)
        if n == 0:
            return q
        half = head_dim // 2
        cs = kv_cache.stride()
        _rotary_write_kv_kernel[(n,)](
            qk, value, cos, sin_signed, q, kv_cache, slot_mapping,
            num_heads, num_kv_heads,
            qk.stride(0), qk.stride(1), value.stride(0), value.stride(1),
            cos.stride(0), sin_signed.stride(0), q.stride(0), q.stride(1),
            cs[0], cs[1], cs[2], cs[3],
            HALF=half,
            PAGE_SIZE=kv_cache.shape[2],
            BLOCK_H=triton.next_power_of_2(n_qk),
            BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_KV=triton.next_power_of_2(num_kv_heads),
            num_warps=4,
            enable_fp_fusion=False,  # as kernels.triton_fused's rotary: no FMA, torch's roundings
        )
        return q

    # -- attend ---------------------------------------------------------------------------------
    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        if query.stride(-1) != 1:
            query = query.contiguous()
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if query.shape[0] == 0 or not metadata.seq_lens_cpu:
            return out
        # A mixed step's decodes go to the decode kernel: in the prefill kernel each would take
        # query tiles of up to 128 rows with one real row (on the H200, W1's prefill-attention
        # time was mostly these).
        decodes, rest = metadata.split_decodes()
        if decodes is not None:
            self._decode(query, kv_cache, decodes, scale, out)
        if rest is not None:
            self._prefill(query, kv_cache, rest, scale, out)
        return out

    @staticmethod
    def _common(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata):
        num_heads, head_dim = query.shape[1], query.shape[2]
        shape, cs = kv_cache.shape, kv_cache.stride()
        num_kv_heads = shape[3]
        assert shape[4] == head_dim and cs[-1] == 1
        assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
        assert shape[2] == metadata.block_size
        return num_heads, head_dim, num_kv_heads, cs

    def _prefill(self, query, kv_cache, md: AttentionMetadata, scale: float, out: torch.Tensor) -> None:
        num_heads, head_dim, num_kv_heads, cs = self._common(query, kv_cache, md)
        block_d = max(16, triton.next_power_of_2(head_dim))
        fp32 = kv_cache.dtype == torch.float32
        max_q = md.max_query_len
        if max_q <= 16:
            block_m, num_warps = 16, 4
        elif max_q <= 32:
            block_m, num_warps = 32, 4
        elif max_q < 256 or fp32 or block_d > 128:
            block_m, num_warps = 64, 4
        else:
            block_m, num_warps = 128, 8
        block_n = 32 if (fp32 or block_d > 128) else 64
        if fp32 and block_d > 128:  # keep the fp32 tiles within shared memory
            block_m = min(block_m, 32)
        grid = (triton.cdiv(max_q, block_m), md.num_seqs, num_heads)
        bt = md.block_tables
        _prefill_kernel[grid](
            query, kv_cache, out, bt, md.query_start_loc, md.seq_lens,
            scale * _LOG2E, num_heads // num_kv_heads,
            query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            cs[0], cs[1], cs[2], cs[3],
            bt.stride(0),
            PAGE_SIZE=md.block_size,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            IEEE=fp32,
            num_warps=num_warps,
            num_stages=2,
        )

    def num_decode_splits(self, num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device,
                          block_n: int = DECODE_BLOCK_N) -> int:
        """How many programs split each (sequence, kv head)'s context: only as many as the
        (sequence, kv head) pairs alone leave the GPU underused, and no more than ``max_seq_len``
        has key tiles. The kernel deals each sequence's own tiles out over them."""
        key = (num_seqs, num_kv_heads, max_seq_len, device, block_n)
        hit = self._splits_cache.get(key)
        if hit is not None:
            return hit
        tiles = triton.cdiv(max(max_seq_len, 1), block_n)
        pairs = num_seqs * num_kv_heads
        target = 2 * _num_sms(device)
        splits = 1 if pairs >= target else min(tiles, triton.cdiv(target, pairs), self.MAX_SPLITS)
        if len(self._splits_cache) > 4096:
            self._splits_cache.clear()
        self._splits_cache[key] = splits
        return splits

    def _decode(self, query, kv_cache, md: AttentionMetadata, scale: float, out: torch.Tensor) -> None:
        num_heads, head_dim, num_kv_heads, cs = self._common(query, kv_cache, md)
        num_seqs = md.num_seqs
        group = num_heads // num_kv_heads
        block_d = max(16, triton.next_power_of_2(head_dim))
        block_g = max(16, triton.next_power_of_2(group))
        block_n = self.DECODE_BLOCK_N if block_d <= 128 else 32
        fp32 = kv_cache.dtype == torch.float32
        splits = self.num_decode_splits(num_seqs, num_kv_heads, md.max_seq_len, query.device, block_n)
        if splits > 1:
            # one workspace: acc [num_seqs, num_heads, splits, block_d], then (m, l) [2, num_seqs, num_heads, splits]
            n = num_seqs * num_heads * splits
            work = torch.empty(n * (block_d + 2), dtype=torch.float32, device=query.device)
            part_acc, part_ml = work[: n * block_d], work[n * block_d :]
        else:
            part_acc = part_ml = out  # unused
        bt = md.block_tables
        qs, os_ = query.stride(), out.stride()
        _decode_kernel[(num_seqs, num_kv_heads, splits)](
            query, kv_cache, out, part_acc, part_ml, bt, md.query_start_loc, md.seq_lens,
            scale * _LOG2E, group, num_heads, splits,
            qs[0], qs[1], os_[0], os_[1],
            cs[0], cs[1], cs[2], cs[3],
            bt.stride(0),
            PAGE_SIZE=md.block_size,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_G=block_g,
            BLOCK_N=block_n,
            SPLIT=splits > 1,
            IEEE=fp32,
            num_warps=self.DECODE_WARPS,
            num_stages=self.DECODE_STAGES,
        )
        if splits > 1:
            _decode_reduce_kernel[(num_seqs, num_heads)](
                out, part_acc, part_ml, md.query_start_loc, md.seq_lens, num_heads, splits,
                os_[0], os_[1],
                HEAD_DIM=head_dim,
                BLOCK_D=block_d,
                BLOCK_S=triton.next_power_of_2(splits),
                BLOCK_N=block_n,
                num_warps=4,
            )


__all__ = ["TritonBackend"]
