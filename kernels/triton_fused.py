"""Fused Triton kernels for the model layers' elementwise work: activations, RMSNorm and
LayerNorm (each with the residual add), and rotary embeddings. CUDA tensors; CPU tensors under
``TRITON_INTERPRET=1``.

Each kernel reproduces the rounding of the torch code it replaces (``kernels/fused_ops.py`` holds
those references and decides when these run): math in fp32, and an intermediate is rounded to the
tensor dtype wherever torch would have stored it in that dtype between two kernels. So a bf16
``x * sigmoid(1.702 * x)`` rounds ``1.702 * x``, the sigmoid and the product, as torch does. The
rotaries and the residual add are then bit-equal to torch; the rest within one ulp, except where
an fp32 value lands on a rounding tie of an intermediate (exp and the norm's reduction order
differ by a few fp32 ulps from torch's), which can give two ulps after the next product
(see tests/test_fused_kernels.py for the tolerances).

Kernels (one program per row, or per (row, column block) for the elementwise ones):
  * ``_act_kernel``: y = act(x) (quick_gelu, silu).
  * ``_gated_kernel``: y = act(gate) * up, gate and up two row-strided views (e.g. the halves of
    a merged gate/up projection).
  * ``_rms_norm_kernel``: HF's RMSNorm (normalise in fp32, round, times weight), optionally after
    ``x + residual`` (rounded, and written out as the new residual).
  * ``_layer_norm_kernel``: torch's LayerNorm (mean, biased variance, ``(x - mean) * rstd * w + b``
    in fp32, one rounding), optionally after ``x + residual`` (rounded, and written out as the new
    residual); several narrow rows per program.
  * ``_rotary_kernel``: neox rotary of q and k heads together, ``x * cos + swap_halves(x) * sin``
    with a signed sin table, every product and the sum rounded to the dtype.
  * ``_vision_rotary_kernel``: the same over q and k of a vision qkv [P, 3, H, D] with fp32 tables,
    in fp32, written as one [2, P, H, D] tensor (q = out[0], k = out[1], both contiguous).

Launchers take shapes from the tensors only (no host sync) and allocate only their outputs, so
they can be captured in CUDA graphs. fp32 is accepted too (roundings are then no-ops).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# RMSNorm keeps a whole row in registers; wider rows take the torch path (see fused_ops).
MAX_NORM_WIDTH = 32768
# LayerNorm keeps a row and its centred copy in registers: 8192 wide (Qwen2-VL's vision width is
# 1280) compiles for sm_90 to 64 registers a thread at 8 warps, no spills; wider rows take torch's.
MAX_LAYER_NORM_WIDTH = 8192

# -- shared helpers --------------------------------------------------------------------------------

# False when this module was imported under Triton's interpreter (TRITON_INTERPRET=1: CPU tests)
_COMPILED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to ``DTYPE`` (nearest even, as ``Tensor.to``), returned as fp32.

    Compiled, the GPU's conversions do it (cvt.rn: one instruction). Under Triton's interpreter,
    whose fp32 -> bf16 cast truncates (the CPU tests run there), bf16 is rounded with integer
    arithmetic instead: the same bits. NaN passes through.
    """
    if DTYPE == tl.bfloat16 and _COMPILED:
        return x.to(tl.bfloat16).to(tl.float32)
    elif DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        return tl.where(is_nan, x, rounded.to(tl.float32, bitcast=True))
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _act(x, ACT: tl.constexpr, DTYPE: tl.constexpr):
    """act(x) for fp32 ``x`` holding ``DTYPE`` values, rounded as torch's op sequence rounds."""
    # The fp32 division is the GPU's fast one (div.full: 2 ulps of fp32, like the exp): torch
    # divides exactly, but both sit far below the dtype's rounding, which they can move only at a
    # tie (the tests' 1-ulp allowance); the exact division made these kernels ALU-bound.
    if ACT == "quick_gelu":
        # torch: x * sigmoid(1.702 * x), three kernels, each result stored in the dtype
        t = _round(x * 1.702, DTYPE)
        s = _round(1.0 / (1.0 + tl.exp(-t)), DTYPE)
        return _round(x * s, DTYPE)
    else:  # "silu": torch computes x / (1 + exp(-x)) in fp32 and rounds once
        return _round(x / (1.0 + tl.exp(-x)), DTYPE)


# -- activations -----------------------------------------------------------------------------------


@triton.jit
def _act_kernel(x_ptr, o_ptr, n_cols, stride_x, stride_o, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = o_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = _act(x, ACT, dtype)
    tl.store(o_ptr + row * stride_o + cols, y.to(dtype), mask=mask)


@triton.jit
def _gated_kernel(
    g_ptr, u_ptr, o_ptr, n_cols, stride_g, stride_u, stride_o, ACT: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = o_ptr.dtype.element_ty
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = _round(_act(g, ACT, dtype) * u, dtype)
    tl.store(o_ptr + row * stride_o + cols, y.to(dtype), mask=mask)


def _elementwise_cfg(n_cols: int) -> tuple[int, int]:
    block = min(1024, triton.next_power_of_2(max(n_cols, 1)))
    return block, 4 if block >= 512 else 2


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x viewed as [rows, last dim] with unit column stride (copies only when it cannot be)."""
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    if not x.is_contiguous():
        x = x.contiguous()
    return x.view(-1, x.shape[-1])


def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """``act(x)`` ("quick_gelu" or "silu") elementwise; x: [..., C] -> same shape and dtype."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    x2, o2 = _as_rows(x), out.view(-1, x.shape[-1])
    n_rows, n_cols = x2.shape
    block, warps = _elementwise_cfg(n_cols)
    _act_kernel[(n_rows, triton.cdiv(n_cols, block))](
        x2, o2, n_cols, x2.stride(0), o2.stride(0), ACT=act, BLOCK=block, num_warps=warps
    )
    return out


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 * x)`` in one kernel; x: [..., C]."""
    return activation(x, "quick_gelu")


def _gated(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    n_rows, n_cols = gate.shape
    out = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    if gate.stride(1) != 1:
        gate = gate.contiguous()
    if up.stride(1) != 1:
        up = up.contiguous()
    block, warps = _elementwise_cfg(n_cols)
    _gated_kernel[(n_rows, triton.cdiv(n_cols, block))](
        gate, up, out, n_cols, gate.stride(0), up.stride(0), out.stride(0), ACT=act, BLOCK=block, num_warps=warps
    )
    return out


def act_and_mul(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """``act(gate) * up``; gate, up: [N, I] (row-strided views allowed) -> [N, I] contiguous."""
    return _gated(gate, up, act)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [N, 2I] (gate | up) -> silu(gate) * up: [N, I]."""
    half = x.shape[-1] // 2
    x = _as_rows(x)
    return _gated(x[:, :half], x[:, half:], "silu")


# -- RMSNorm ---------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, o_ptr, ro_ptr,
    n_cols, stride_x, stride_r, stride_o, stride_ro, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = o_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = _round(x + r, dtype)  # what ``x = x + h`` stores
        tl.store(ro_ptr + row * stride_ro + cols, x.to(dtype), mask=mask)
    var = tl.sum(x * x, axis=0) / n_cols
    rstd = tl.math.rsqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = _round(x * rstd, dtype)  # HF: normalise in fp32, cast to the input dtype, then scale
    y = _round(w * y, dtype)
    tl.store(o_ptr + row * stride_o + cols, y.to(dtype), mask=mask)


def _norm_launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    n_cols = x.shape[-1]
    x2 = _as_rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    if x.numel() == 0:
        return out, res_out
    r2 = _as_rows(residual) if residual is not None else x2
    if weight.stride(0) != 1:
        weight = weight.contiguous()
    o2, ro2 = out.view(-1, n_cols), res_out.view(-1, n_cols)
    block = triton.next_power_of_2(n_cols)
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, o2, ro2,
        n_cols, x2.stride(0), r2.stride(0), o2.stride(0), ro2.stride(0), eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=warps,
    )
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm of x: [..., C] (C <= MAX_NORM_WIDTH) with weight [C] of x's dtype."""
    return _norm_launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to the dtype; x, residual: [..., C]."""
    return _norm_launch(x, residual, weight, eps)


# -- LayerNorm -------------------------------------------------------------------------------------


# Not specialised on n_rows (the batch's row count): no recompile per batch size class.
@triton.jit(do_not_specialize=['n_rows'])
def _layer_norm_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, o_ptr, ro_ptr,
    n_rows, n_cols, stride_x, stride_r, stride_o, stride_ro, eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One [BLOCK_M, BLOCK_N] tile = BLOCK_M whole rows (BLOCK_M > 1 only for narrow rows, so that
    # a program still has enough elements per thread); columns are unit-stride (vector loads).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    dtype = o_ptr.dtype.element_ty
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = _round(x + r, dtype)  # what ``x + residual`` stores: the norm reads the rounded sum
        tl.store(ro_ptr + rows[:, None] * stride_ro + cols[None, :], x.to(dtype), mask=mask)
    # Two-pass mean / variance over the row held in registers (torch uses Welford: same values
    # up to fp32 rounding, which the single rounding to the dtype below absorbs but for ties).
    mean = tl.sum(x, axis=1) / n_cols  # [BLOCK_M]
    xc = tl.where(col_mask[None, :], x - mean[:, None], 0.0)  # masked lanes must not add to var
    var = tl.sum(xc * xc, axis=1) / n_cols  # biased, as torch's
    rstd = tl.math.rsqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = (xc * rstd[:, None]) * w[None, :]  # torch's CUDA order: gamma * (rstd * (x - mean)) + beta
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    # torch rounds the fp32 result once (no intermediate in the dtype, unlike HF's RMSNorm)
    tl.store(o_ptr + rows[:, None] * stride_o + cols[None, :], _round(y, dtype).to(dtype), mask=mask)


def _layer_norm_cfg(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N columns, warps) of a program for rows of ``n_cols``."""
    block_n = triton.next_power_of_2(n_cols)
    # Narrow rows (e.g. 80 -> 128 columns): pack rows up to a 1024-element tile, so a 4-warp
    # program still has 8 elements a thread instead of idling most of its lanes.
    block_m = max(1, min(16, 1024 // block_n))
    tile = block_m * block_n
    warps = 4 if tile <= 2048 else (8 if tile <= 8192 else 16)
    return block_m, block_n, warps


def _layer_norm_launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # x, residual: [..., C]; weight, bias: [C] -> normed [..., C], new residual [..., C] (contiguous;
    # the second is ``out`` itself when there is no residual, and then unused)
    n_cols = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    if x.numel() == 0:
        return out, res_out
    x2 = _as_rows(x)
    r2 = _as_rows(residual) if residual is not None else x2
    if weight.stride(0) != 1:
        weight = weight.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    o2, ro2 = out.view(-1, n_cols), res_out.view(-1, n_cols)
    n_rows = x2.shape[0]
    block_m, block_n, warps = _layer_norm_cfg(n_cols)
    _layer_norm_kernel[(triton.cdiv(n_rows, block_m),)](
        x2, r2, weight, bias if bias is not None else weight, o2, ro2,
        n_rows, n_cols, x2.stride(0), r2.stride(0), o2.stride(0), ro2.stride(0), eps,
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps,
    )
    return out, res_out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``F.layer_norm(x, (C,), weight, bias, eps)`` of x: [..., C] (C <= MAX_LAYER_NORM_WIDTH);
    weight, bias: [C] of x's dtype (bias may be None)."""
    return _layer_norm_launch(x, None, weight, bias, eps)[0]


def fused_add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x + residual), x + residual), the sum rounded to the dtype and normalised from
    that rounded value; x, residual: [..., C] (row-strided views allowed), weight, bias: [C]."""
    return _layer_norm_launch(x, residual, weight, bias, eps)


# -- rotary ----------------------------------------------------------------------------------------


@triton.jit
def _neox_rotate(xp, cp, sp, mask, d_mask, HALF: tl.constexpr, DTYPE: tl.constexpr):
    """Neox rotary of the heads at ``xp`` ([heads, BLOCK_HALF] pointers to each first half) by
    the tables at ``cp`` / ``sp`` ([BLOCK_HALF] pointers, sin signed): the two rotated halves,
    fp32 holding DTYPE values rounded as torch's op sequence in DTYPE rounds them."""
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cp, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cp + HALF, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sp, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sp + HALF, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    # torch in the dtype: x * cos and swap_halves(x) * sin are each stored, then added
    o1 = _round(_round(x1 * c1, DTYPE) + _round(x2 * s1, DTYPE), DTYPE)
    o2 = _round(_round(x2 * c2, DTYPE) + _round(x1 * s2, DTYPE), DTYPE)
    return o1, o2


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, o_ptr,
    n_heads, stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    mask = (heads < n_heads)[:, None] & d_mask[None, :]
    dtype = o_ptr.dtype.element_ty
    xp = x_ptr + tok * stride_xt + heads[:, None] * stride_xh + d[None, :]
    o1, o2 = _neox_rotate(xp, cos_ptr + tok * stride_ct + d, sin_ptr + tok * stride_st + d, mask, d_mask, HALF, dtype)
    op = o_ptr + tok * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(op, o1.to(dtype), mask=mask)
    tl.store(op + HALF, o2.to(dtype), mask=mask)


def rotary(
    x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Full neox rotary of x: [N, heads, D] (rows and heads may be strided, e.g. the q|k part of a
    merged qkv) by cos, signed sin [N, 1, D] or [N, D] of x's dtype -> ``out`` (new [N, heads, D]
    when None; ``out=x`` rotates in place: every program reads its rows before writing them)."""
    n, n_heads, head_dim = x.shape
    if out is None:
        out = torch.empty((n, n_heads, head_dim), dtype=x.dtype, device=x.device)
    if n == 0 or n_heads == 0:
        return out
    if x.stride(2) != 1:
        x = x.contiguous()
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(n_heads), max(1, 2048 // block_half))
    _rotary_kernel[(n, triton.cdiv(n_heads, block_h))](
        x, cos, sin_signed, out,
        n_heads, x.stride(0), x.stride(1), cos.stride(0), sin_signed.stride(0), out.stride(0), out.stride(1),
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=4 if block_h * block_half >= 1024 else 2,
        enable_fp_fusion=False,  # fp32 inputs: no FMA, so x * c + y * s rounds as torch's two kernels do
    )
    return out


# Not specialised on n_tokens (the pass's patch count): no recompile per batch size class.
@triton.jit(do_not_specialize=['n_tokens'])
def _vision_rotary_kernel(
    qkv_ptr, cos_ptr, sin_ptr, o_ptr,
    n_tokens, n_heads, stride_t, stride_w, stride_h, stride_ct, stride_st,
    HALF: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # rows r = which * H + head over q (which 0) and k (which 1)
    tok = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    which = (r // n_heads).to(tl.int64)
    head = r % n_heads
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    mask = (r < 2 * n_heads)[:, None] & d_mask[None, :]
    dtype = o_ptr.dtype.element_ty
    xp = qkv_ptr + tok * stride_t + (which * stride_w + head * stride_h)[:, None] + d[None, :]
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + tok * stride_ct + d, mask=d_mask, other=0.0)[None, :]
    c2 = tl.load(cos_ptr + tok * stride_ct + HALF + d, mask=d_mask, other=0.0)[None, :]
    s1 = tl.load(sin_ptr + tok * stride_st + d, mask=d_mask, other=0.0)[None, :]
    s2 = tl.load(sin_ptr + tok * stride_st + HALF + d, mask=d_mask, other=0.0)[None, :]
    o1 = _round(x1 * c1 + x2 * s1, dtype)  # fp32 math, one rounding: HF's ``.float()`` ... ``.to(dtype)``
    o2 = _round(x2 * c2 + x1 * s2, dtype)
    # out: [2, P, H, D] contiguous
    row_off = (which * n_tokens + tok) * n_heads + head
    op = o_ptr + (row_off * (2 * HALF))[:, None] + d[None, :]
    tl.store(op, o1.to(dtype), mask=mask)
    tl.store(op + HALF, o2.to(dtype), mask=mask)


def vision_rotary(
    qkv: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of qkv: [P, 3, H, D] rotated in fp32 by cos, signed sin [P, D] fp32 -> q, k
    [P, H, D] contiguous in qkv's dtype (views of one [2, P, H, D] tensor)."""
    p, _, n_heads, head_dim = qkv.shape
    out = torch.empty((2, p, n_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if out.numel() == 0:
        return out[0], out[1]
    if qkv.stride(3) != 1:
        qkv = qkv.contiguous()
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_r = min(triton.next_power_of_2(2 * n_heads), max(1, 2048 // block_half))
    s = qkv.stride()
    _vision_rotary_kernel[(p, triton.cdiv(2 * n_heads, block_r))](
        qkv, cos, sin_signed, out,
        p, n_heads, s[0], s[1], s[2], cos.stride(0), sin_signed.stride(0),
        HALF=half,
        BLOCK_R=block_r,
        BLOCK_HALF=block_half,
        num_warps=4 if block_r * block_half >= 1024 else 2,
        enable_fp_fusion=False,  # no FMA: torch's fp32 mul, mul, add are separately rounded
    )
    return out[0], out[1]


__all__ = [
    "MAX_LAYER_NORM_WIDTH",
    "MAX_NORM_WIDTH",
    "act_and_mul",
    "activation",
    "fused_add_layer_norm",
    "fused_add_rms_norm",
    "layer_norm",
    "quick_gelu",
    "rms_norm",
    "rotary",
    "silu_and_mul",
    "vision_rotary",
]
