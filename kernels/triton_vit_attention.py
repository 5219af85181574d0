"""Bidirectional attention within equal-length frames, for vision towers (Triton, CUDA).

A ViT pass attends within each image (frame): rows ``[row0 + f*L, row0 + (f+1)*L)`` of q / k / v
[P, H, D] see only each other. Qwen2-VL's head_dim is 80, which is no power of two: cuDNN's SDPA
kernel pads it to 128 and FlashAttention-2's to 96, so a third or a sixth of their matrix work
multiplies zeros. Here a head is split into a power-of-two part and a power-of-two remainder
(80 = 64 + 16), each its own ``tl.dot``: s = q_a k_a^T + q_b k_b^T, o_a = p v_a, o_b = p v_b, so
every multiply is on real data. Otherwise FlashAttention's forward: online softmax over key
tiles in the exp2 domain, fp32 accumulators, p rounded to the input dtype for the PV product.

Measured on the H200 (bench/vision_attention_bench.py; 16 images x 16 heads x 1024 patches x 80):
the first version, 0.300 ms a call in its best launch config against cuDNN's 0.237 ms
(vision_attention_h200.json), W1 21.0k output tokens/s against 21.6-21.8k with cuDNN
(gpu_throughput_h200_vit_triton.json). The softmax's per-score work rivals the dots' at head dim
80 (an exp2 and ~5 fp32 operations against 320 flops of matrix work), so this version folds the
scale into the max subtraction (one FMA a score) and adds a TMA variant: on another H200, 0.296
ms against cuDNN's 0.289 there (vision_attention_h200_fma.json): level with cuDNN, not ahead. So
it stays opt-in (``VLMSERVE_VIT_ATTENTION=triton``, see ``kernels.fused_ops.vit_attention``);
beating cuDNN needs the softmax overlapped with the dots of another tile (FlashAttention-3's
warp-specialised ping-pong), which plain Triton on Hopper does not schedule.

q / k / v are any [P, H, D] views with unit stride on D (e.g. v = qkv[:, 2] of a fused qkv
projection); the output is a new contiguous [P, H, D]. Launchers take shapes from the tensors (no
host sync), so a vision pass with them can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


def split_head_dim(d: int) -> tuple[int, int]:
    """(power-of-two part, power-of-two remainder or 0) of a head dim, or raise if it has no such
    split (e.g. 80 -> (64, 16), 64 -> (64, 0), 96 -> (64, 32); 72 -> (64, 8) is refused: tl.dot
    needs at least 16 along K)."""
    a = 1 << (d.bit_length() - 1)
    b = d - a
    if a < 16 or (b and (b & (b - 1) or b < 16)):
        raise ValueError(f"head_dim {d} is not a power of two (>= 16) plus zero or a power of two >= 16")
    return a, b


@triton.jit
def _online_softmax(s, m_i, l_i, qk_scale):
    """One key tile of FlashAttention's online softmax in the exp2 domain. s: [M, N] unscaled
    scores (-inf where masked). Returns (p [M, N] fp32, alpha [M] to rescale the accumulators,
    new m_i, new l_i). The scale goes inside one FMA with the max subtraction (max of the unscaled
    scores, scaled: the scale is positive): at head_dim 80 the softmax's work per score rivals the
    dots'."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _store_rows(o_ptr, rows, head, stride_ot, stride_oh, acc_a, acc_b, l_i, m_mask,
                DA: tl.constexpr, DB: tl.constexpr):
    """out[rows, head, :] = [acc_a | acc_b] / l_i, rows past the frame (m_mask false) skipped."""
    inv = 1.0 / l_i
    out_rows = rows[:, None] * stride_ot + head * stride_oh
    da = tl.arange(0, DA)
    tl.store(o_ptr + out_rows + da[None, :], (acc_a * inv[:, None]).to(o_ptr.dtype.element_ty), mask=m_mask[:, None])
    if DB > 0:
        db = DA + tl.arange(0, DB)
        tl.store(o_ptr + out_rows + db[None, :], (acc_b * inv[:, None]).to(o_ptr.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def _vit_attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    row0, seq_len, num_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    qk_scale,
    DA: tl.constexpr,
    DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    fh = tl.program_id(1)
    frame = fh // num_heads
    head = fh % num_heads
    base = (row0 + frame * seq_len).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seq_len
    rows = base + offs_m
    da = tl.arange(0, DA)
    qa = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + da[None, :], mask=m_mask[:, None], other=0.0)
    if DB > 0:
        db = DA + tl.arange(0, DB)
        qb = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + db[None, :], mask=m_mask[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    if DB > 0:
        acc_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    else:
        acc_b = acc_a  # a placeholder: _store_rows writes no second part then
    for start_n in range(0, seq_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        krows = base + offs_n
        if EVEN:
            n_mask = offs_n >= 0
        else:
            n_mask = offs_n < seq_len
        # K as [N, D] rows (contiguous along D, as V), transposed for the dot
        ka = tl.load(k_ptr + krows[:, None] * stride_kt + head * stride_kh + da[None, :], mask=n_mask[:, None], other=0.0)
        s = tl.dot(qa, tl.trans(ka))  # [M, N], unscaled
        if DB > 0:
            kb = tl.load(k_ptr + krows[:, None] * stride_kt + head * stride_kh + db[None, :], mask=n_mask[:, None], other=0.0)
            s = tl.dot(qb, tl.trans(kb), s)
        if not EVEN:
            s = tl.where(n_mask[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
        p = p.to(v_ptr.dtype.element_ty)
        va = tl.load(v_ptr + krows[:, None] * stride_vt + head * stride_vh + da[None, :], mask=n_mask[:, None], other=0.0)
        acc_a = tl.dot(p, va, acc_a * alpha[:, None])
        if DB > 0:
            vb = tl.load(v_ptr + krows[:, None] * stride_vt + head * stride_vh + db[None, :], mask=n_mask[:, None], other=0.0)
            acc_b = tl.dot(p, vb, acc_b * alpha[:, None])

    _store_rows(o_ptr, rows, head, stride_ot, stride_oh, acc_a, acc_b, l_i, m_mask, DA, DB)


@triton.jit
def _vit_attn_tma_kernel(
    qa_desc, qb_desc, ka_desc, kb_desc, va_desc, vb_desc, o_ptr,
    row0, seq_len, num_heads, stride_ot, stride_oh,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    DA: tl.constexpr,
    DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN: tl.constexpr,
):
    # The same computation as _vit_attn_kernel, its tiles brought in by the tensor memory
    # accelerator (Hopper's TMA) from 2D [P, H * D] descriptors: a tile's row past the frame's end
    # reads the next frame's (or zeros past the tensor's end), so those keys are masked to -inf as
    # in the plain kernel, and the output is stored through masked pointers, never past the frame.
    pid_m = tl.program_id(0)
    fh = tl.program_id(1)
    frame = fh // num_heads
    head = fh % num_heads
    base = row0 + frame * seq_len
    col = head * HEAD_DIM
    qrow = base + pid_m * BLOCK_M
    qa = qa_desc.load([qrow, col])
    if DB > 0:
        qb = qb_desc.load([qrow, col + DA])

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    if DB > 0:
        acc_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    else:
        acc_b = acc_a  # a placeholder: _store_rows writes no second part then
    for start_n in range(0, seq_len, BLOCK_N):
        krow = base + start_n
        s = tl.dot(qa, ka_desc.load([krow, col]).T)  # [M, N], unscaled
        if DB > 0:
            s = tl.dot(qb, kb_desc.load([krow, col + DA]).T, s)
        if not EVEN:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            s = tl.where((offs_n < seq_len)[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
        p = p.to(o_ptr.dtype.element_ty)
        acc_a = tl.dot(p, va_desc.load([krow, col]), acc_a * alpha[:, None])
        if DB > 0:
            acc_b = tl.dot(p, vb_desc.load([krow, col + DA]), acc_b * alpha[:, None])

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = (base + offs_m).to(tl.int64)
    _store_rows(o_ptr, rows, head, stride_ot, stride_oh, acc_a, acc_b, l_i, offs_m < seq_len,
                DA, DB)


# (BLOCK_M, BLOCK_N, num_warps, num_stages, tma); tma loads tiles through tensor descriptors
# (Hopper and later; q / k / v with heads packed along a row, 16-byte aligned rows). On W1's shape
# an H200 measured, in this order: 0.296, 0.297, 0.335, 0.339, 0.307 and 0.334 ms, with cuDNN's
# SDPA at 0.289 ms on that machine (bench/results/vision_attention_h200_fma.json; 9 more configs
# measured 0.36-0.47 ms and were dropped). The first is the default.
CONFIGS = ((64, 64, 4, 3, False), (128, 64, 4, 3, False), (128, 128, 8, 3, False), (64, 32, 4, 4, False),
           (64, 64, 4, 3, True), (128, 64, 4, 3, True))
DEFAULT_CONFIG = CONFIGS[0]


def _tma_ok(*ts: torch.Tensor) -> bool:
    """Whether [P, H, D] tensors can be 2D [P, H * D] TMA descriptors: heads packed along a row,
    16-byte aligned base and row stride."""
    return all(t.stride(1) == t.shape[2] and t.stride(2) == 1 and (t.data_ptr() % 16 == 0)
               and (t.stride(0) * t.element_size()) % 16 == 0 for t in ts)


def vit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    runs: list[tuple[int, int, int, int]] | None = None,
    scale: float | None = None,
    config: tuple[int, int, int, int, bool] = DEFAULT_CONFIG,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v within frames. q, k, v: [P, H, D] (unit stride on D); runs:
    (first row, end row, frames, rows per frame) of consecutive equal-length frames (default: one
    frame of all P rows); returns [P, H, D] (``out`` if given). A TMA config falls back to plain
    loads where the tensors' layout does not allow descriptors."""
    p_rows, num_heads, d = q.shape
    da, db = split_head_dim(d)
    if not (k.shape == v.shape == q.shape and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1):
        raise ValueError(f"vit_attention: q, k, v must be [P, H, D] with unit stride on D, got "
                         f"{tuple(q.shape)} {tuple(k.shape)} {tuple(v.shape)}")
    if out is None:
        out = torch.empty((p_rows, num_heads, d), dtype=q.dtype, device=q.device)
    scale = d**-0.5 if scale is None else scale
    block_m, block_n, warps, stages, tma = config
    descs = None
    if tma and _tma_ok(q, k, v):
        from triton.tools.tensor_descriptor import TensorDescriptor

        def desc(t: torch.Tensor, rows: int, cols: int) -> TensorDescriptor:
            # [P, H, D] -> 2D [P, H * D] with the tensor's row stride
            return TensorDescriptor(t, [p_rows, num_heads * d], [t.stride(0), 1], [rows, cols])

        descs = (desc(q, block_m, da), desc(q, block_m, max(db, 16)), desc(k, block_n, da),
                 desc(k, block_n, max(db, 16)), desc(v, block_n, da), desc(v, block_n, max(db, 16)))
    for start, end, frames, length in runs or [(0, p_rows, 1, p_rows)]:
        assert (end - start) == frames * length, "a run is whole frames"
        grid = (triton.cdiv(length, block_m), frames * num_heads)
        even = length % block_n == 0
        if descs is not None:
            _vit_attn_tma_kernel[grid](
                *descs, out, start, length, num_heads, out.stride(0), out.stride(1), scale * _LOG2E,
                HEAD_DIM=d, DA=da, DB=db, BLOCK_M=block_m, BLOCK_N=block_n, EVEN=even,
                num_warps=warps, num_stages=stages,
            )
            continue
        _vit_attn_kernel[grid](
            q, k, v, out, start, length, num_heads,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            scale * _LOG2E,
            DA=da, DB=db, BLOCK_M=block_m, BLOCK_N=block_n, EVEN=even,
            num_warps=warps, num_stages=stages,
        )
    return out


__all__ = ["CONFIGS", "DEFAULT_CONFIG", "split_head_dim", "vit_attention"]
