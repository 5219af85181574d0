"""Skinny-M GEMV kernels (Triton): ``y = x @ weight.T + bias`` for M <= 8 rows, bandwidth-bound.

Why: batch-1 decode of Qwen2-VL-2B (bf16, H100) spent 1.48 ms a step in cuBLAS GEMMs with M=1,
most of them far from the ~3.0 TB/s the card copies at (per call, in a CUDA graph): qkv_proj
(N=2048, K=1536, +bias) 5.7 us (~1.1 TB/s), o_proj (1536 x 1536) 5.0 us (~0.94 TB/s), gate_up
(17920 x 1536) 22.6 us (2.43 TB/s), down_proj (1536 x 8960) 11.9 us + a 1.8 us split-K reduce
(2.3 TB/s), lm_head (151936 x 1536) 163 us (2.86 TB/s); and a separate 2.1 us silu_and_mul
kernel ran before every down_proj. These kernels stream the weight once, with enough programs
for small N, and fold the SwiGLU activation into the down projection's input. Measured the same
way at M=1 (bench/gemv_bench.py, bench/results/gemv_h100.json): qkv 4.4 us, o_proj 3.9 us,
gate_up 20.3 us, down_proj with the activation 13.4 us (cuBLAS + silu_and_mul: 16.9 us), lm_head
149 us (3.1 TB/s).

Launchers:
  * ``gemv(x, weight, bias)``: x [M, K] (any row stride, unit column stride), weight [N, K]
    contiguous (``nn.Linear`` layout), bias [N] or None -> y [M, N] contiguous in x's dtype.
  * ``gemv_silu_mul(x, weight, bias)``: x [M, 2K] = gate | up (a merged gate/up projection); the
    GEMV input is ``silu(gate) * up`` computed and rounded to the dtype exactly as
    ``kernels.triton_fused._gated_kernel`` does (its ``_act`` / ``_round``), so the result equals
    ``gemv(triton_fused.silu_and_mul(x), weight, bias)`` bit for bit.

Layout and arithmetic: program ``p`` owns output columns ``[p * BLOCK_N, (p + 1) * BLOCK_N)`` for
all M rows (each weight tile is read once for all of them) and walks the whole K in BLOCK_K
chunks; ``+ bias`` in fp32 and one rounding to the dtype (round-to-nearest-even, also under
Triton's interpreter) at the end. Two kernels, chosen per shape by the config:
  * ``_gemv_kernel`` (CUDA cores; best for M = 1, 2): the M rows unrolled at compile time, each
    accumulating ``x * w`` elementwise in an fp32 [BLOCK_N, BLOCK_K] tile (products of two
    fp16/bf16 values are exact in fp32, so FMA contraction changes nothing), one tree reduction
    over BLOCK_K at the end;
  * ``_gemv_dot_kernel`` (tensor cores, ``dot=True``; for M up to 8, where the elementwise form
    runs out of registers and issue slots): ``acc[BLOCK_N, 16] += w_tile @ x_tile.T`` with x's
    rows zero-padded to 16, fp32 accumulation.
Loops are software-pipelined (``tl.range(num_stages=...)``: cp.async prefetch of the next tiles).
Deterministic: no atomics, no split-K; the summation order depends only on the launch config, a
function of (M, N, K) (``config_for``), so ``gemv`` and ``gemv_silu_mul`` of one shape sum in the
same order. ``use_gemv(M, N, K)`` says whether the table found the GEMV faster than cuBLAS for a
shape (``fused_ops`` asks it before dispatching).

Launchers allocate only the output, take shapes from tensors and never sync with the host, so
they can be captured in CUDA graphs; configs are cached per (M, N, K). CPU tensors run under
``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.triton_fused import _act, _round

GEMV_MAX_M = 8  # rows per launch
# Up to this many rows ``fused_ops.silu_and_mul_linear`` runs ``gemv_silu_mul``; above, the
# activation kernel and then ``gemv`` (the same bits): the fused activation is recomputed by every
# program (N / BLOCK_N times per element), which only pays for itself at M = 1 (bench/gemv_bench.py).
FUSED_SILU_MAX_M = 1
# Shapes not in the table take the GEMV up to this many rows: the heuristic config beat cuBLAS on
# every Qwen2-VL-2B shape at M = 1 (by 1.10x or more), but was only at par at M = 2.
HEURISTIC_MAX_M = 1


class GemvConfig(NamedTuple):
    """Launch config: output columns a program owns, K chunk, warps, pipeline stages, and whether
    the tensor-core kernel runs (block_n >= 16 then)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    dot: bool = False


_C = GemvConfig
# Tuned on an H100 (bench/gemv_bench.py --sweep, bench/results/gemv_h100.json) for Qwen2-VL-2B's
# text shapes, bf16: (N, K) -> {max rows: config}, the first bucket with ``M <= max rows`` wins
# (so M = 3 takes the M = 4 entry, 5..7 the M = 8 one); None: cuBLAS measured as fast or faster.
# The (1536, 8960) M = 1 entry is the fused activation's best (what the model runs there).
_TABLE: dict[tuple[int, int], dict[int, GemvConfig | None]] = {
    (2048, 1536): {1: _C(2, 1024, 4, 1), 2: _C(2, 1024, 4, 1), 4: _C(4, 256, 2, 3), 8: None},  # qkv_proj
    (1536, 1536): {1: _C(4, 2048, 4, 1), 2: _C(2, 512, 2, 3), 4: _C(2, 256, 2, 3), 8: None},  # o_proj
    (17920, 1536): {1: _C(4, 512, 4, 1), 8: _C(64, 128, 4, 3, True)},  # gate_up_proj
    (1536, 8960): {1: _C(4, 1024, 4, 1), 2: _C(4, 1024, 4, 3), 4: _C(4, 512, 4, 3), 8: None},  # down_proj
    (151936, 1536): {  # lm_head
        1: _C(4, 512, 4, 1), 2: _C(16, 256, 4, 3), 4: _C(16, 256, 4, 4, True), 8: _C(64, 256, 4, 3, True)},
}


def _heuristic(m: int, n: int, k: int, dot_ok: bool = True) -> GemvConfig:
    """A config for shapes not in the table. M <= 2: the CUDA-core kernel with >= ~2 programs per
    SM (132 on an H100) where N allows, at most 64 fp32 accumulator registers a thread, 16-byte
    loads; more rows: the tensor-core kernel (the sweep's best overall at M = 4 and 8)."""
    if m > 2 and dot_ok:
        return GemvConfig(64, 256, 4, 4, True)
    warps = 4
    threads = 32 * warps
    block_k = min(1024, max(16, triton.next_power_of_2(k)))
    block_n = 1
    while block_n < 4 and triton.cdiv(n, 2 * block_n) >= 264:
        block_n *= 2
    while m * block_n * block_k > 64 * threads and block_k > 128:
        block_k //= 2
    while m * block_n * block_k > 64 * threads and block_n > 1:
        block_n //= 2
    return GemvConfig(block_n, block_k, warps, 3)


_CONFIGS: dict[tuple[int, int, int], tuple[GemvConfig, bool]] = {}


def _lookup(m: int, n: int, k: int) -> tuple[GemvConfig, bool]:
    key = (m, n, k)
    hit = _CONFIGS.get(key)
    if hit is None:
        hit = (_heuristic(m, n, k), m <= HEURISTIC_MAX_M)
        for max_m, c in sorted(_TABLE.get((n, k), {}).items()):
            if m <= max_m:
                hit = (c or hit[0], c is not None)
                break
        _CONFIGS[key] = hit
    return hit


def config_for(m: int, n: int, k: int) -> GemvConfig:
    """The launch config of an [m, k] x [n, k]^T GEMV (cached; the table first, else heuristic)."""
    return _lookup(m, n, k)[0]


def use_gemv(m: int, n: int, k: int) -> bool:
    """Whether the GEMV should replace cuBLAS for this shape: the table's word where it has one,
    else M <= HEURISTIC_MAX_M."""
    return _lookup(m, n, k)[1]


@triton.jit
def _x_chunk(x_ptr, row: tl.constexpr, stride_xm, K, kk, k_mask, SILU_MUL: tl.constexpr, DTYPE: tl.constexpr):
    """fp32 [BLOCK_K] GEMV input of row ``row`` at columns ``kk``: x, or silu(gate) * up rounded
    to DTYPE as ``_gated_kernel`` rounds it (0 where masked)."""
    p = x_ptr + row * stride_xm + kk
    if SILU_MUL:
        g = tl.load(p, mask=k_mask, other=0.0).to(tl.float32)
        u = tl.load(p + K, mask=k_mask, other=0.0).to(tl.float32)
        return _round(_act(g, "silu", DTYPE) * u, DTYPE)
    else:
        return tl.load(p, mask=k_mask, other=0.0).to(tl.float32)


@triton.jit
def _store_row(acc, bias, y_ptr, row: tl.constexpr, stride_ym, rn, n_mask, HAS_BIAS: tl.constexpr, DTYPE: tl.constexpr):
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y = y + bias
    tl.store(y_ptr + row * stride_ym + rn, _round(y, DTYPE).to(DTYPE), mask=n_mask)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, K, stride_xm, stride_ym,
    M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    K_STATIC: tl.constexpr,
):
    dtype = y_ptr.dtype.element_ty
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :]
    # One accumulator per row, rows unrolled (M is a constexpr <= 8): only 2-D tiles, no 3-D
    # broadcast, and the weight tile feeds every row from registers.
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    acc4 = acc0
    acc5 = acc0
    acc6 = acc0
    acc7 = acc0
    # K_STATIC: K as a constexpr, under Triton's interpreter only (its runtime scalars are
    # 1-element arrays that ``range`` cannot take with NumPy 2); 0 when compiled.
    # (an expression, not an assignment: the interpreter turns assigned values into tensors).
    for k0 in tl.range(0, K_STATIC if K_STATIC > 0 else K, BLOCK_K, num_stages=NUM_STAGES):
        kk = k0 + rk
        k_mask = kk < K
        w = tl.load(w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_first")
        w = w.to(tl.float32)
        acc0 += _x_chunk(x_ptr, 0, stride_xm, K, kk, k_mask, SILU_MUL, dtype)[None, :] * w
        if M > 1:
            acc1 += _x_chunk(x_ptr, 1, stride_xm, K, kk, k_mask, SILU_MUL, dtype)[None, :] * w
        if M > 2:
            acc2 += _x_chunk(x_ptr, 2, stride_xm, K, kk, k_mask, SILU_MUL, dtype)[None, :] * w
        if M > 3:
            acc3 += _x_chunk(x_ptr, 3, stride_xm, K, kk, k_mask, SILU_MUL, dtype)[None, :] * w
        if M > 4:
            acc4 += _x_chunk(x_ptr, 4, stride_xm, K, kk, k_mask, SILU_MUL, dtype)[None, :] * w
        if M > 5:
            acc5 += _x_chunk(x_ptr, 5, stride_xm, K, kk, k_mask, SILU_MUL, dtype)[None, :] * w
        if M > 6:
            acc6 += _x_chunk(x_ptr, 6, stride_xm, K, kk, k_mask, SILU_MUL, dtype)[None, :] * w
        if M > 7:
            acc7 += _x_chunk(x_ptr, 7, stride_xm, K, kk, k_mask, SILU_MUL, dtype)[None, :] * w
    bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    _store_row(acc0, bias, y_ptr, 0, stride_ym, rn, n_mask, HAS_BIAS, dtype)
    if M > 1:
        _store_row(acc1, bias, y_ptr, 1, stride_ym, rn, n_mask, HAS_BIAS, dtype)
    if M > 2:
        _store_row(acc2, bias, y_ptr, 2, stride_ym, rn, n_mask, HAS_BIAS, dtype)
    if M > 3:
        _store_row(acc3, bias, y_ptr, 3, stride_ym, rn, n_mask, HAS_BIAS, dtype)
    if M > 4:
        _store_row(acc4, bias, y_ptr, 4, stride_ym, rn, n_mask, HAS_BIAS, dtype)
    if M > 5:
        _store_row(acc5, bias, y_ptr, 5, stride_ym, rn, n_mask, HAS_BIAS, dtype)
    if M > 6:
        _store_row(acc6, bias, y_ptr, 6, stride_ym, rn, n_mask, HAS_BIAS, dtype)
    if M > 7:
        _store_row(acc7, bias, y_ptr, 7, stride_ym, rn, n_mask, HAS_BIAS, dtype)


@triton.jit
def _gemv_dot_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    K_STATIC: tl.constexpr,
):
    dtype = y_ptr.dtype.element_ty
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, 16)  # x's rows, zero-padded to the tensor cores' minimum
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    m_mask = rm < M
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + rm[None, :] * stride_xm + rk[:, None]  # x.T: [BLOCK_K, 16]
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    for k0 in tl.range(0, K_STATIC if K_STATIC > 0 else K, BLOCK_K, num_stages=NUM_STAGES):
        k_mask = (k0 + rk) < K
        w = tl.load(w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_first")
        xm = k_mask[:, None] & m_mask[None, :]
        if SILU_MUL:
            g = tl.load(x_ptrs + k0, mask=xm, other=0.0).to(tl.float32)
            u = tl.load(x_ptrs + k0 + K, mask=xm, other=0.0).to(tl.float32)
            xt = _round(_act(g, "silu", dtype) * u, dtype).to(dtype)
        else:
            xt = tl.load(x_ptrs + k0, mask=xm, other=0.0)
        if K_STATIC > 0:  # interpreter only: its dot multiplies bf16 bit patterns as integers
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + rm[None, :] * stride_ym + rn[:, None]
    tl.store(y_ptrs, _round(acc, dtype).to(dtype), mask=n_mask[:, None] & m_mask[None, :])


_INTERPRETED = not isinstance(_gemv_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1 at import


def _launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool, config: GemvConfig | None
) -> torch.Tensor:
    m = x.shape[0]
    n, k = weight.shape
    assert 1 <= m <= GEMV_MAX_M and x.dim() == 2 and x.stride(1) == 1, "gemv: x must be [M <= 8, K], unit column stride"
    assert x.shape[1] == (2 * k if silu_mul else k), (tuple(x.shape), tuple(weight.shape))
    assert weight.is_contiguous() and weight.dtype == x.dtype, "gemv: weight must be contiguous, of x's dtype"
    assert bias is None or (bias.shape == (n,) and bias.dtype == x.dtype and bias.stride(0) == 1)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    cfg = config or config_for(m, n, k)
    if cfg.dot and x.dtype not in (torch.float16, torch.bfloat16):
        cfg = _heuristic(m, n, k, dot_ok=False)  # fp32 would go through TF32 on the tensor cores
    # the CUDA-core kernel holds M [BLOCK_N, BLOCK_K] fp32 accumulators in registers (compiled)
    assert cfg.dot or _INTERPRETED or m * cfg.block_n * cfg.block_k <= 128 * 32 * cfg.num_warps, \
        f"gemv: {cfg} spills at M={m}"
    grid = (triton.cdiv(n, cfg.block_n),)
    b = bias if bias is not None else weight
    k_static = k if _INTERPRETED else 0
    if cfg.dot:
        assert cfg.block_n >= 16 and cfg.block_k >= 16, cfg
        _gemv_dot_kernel[grid](
            x, weight, b, y, m, n, k, x.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, SILU_MUL=silu_mul, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            NUM_STAGES=cfg.num_stages, K_STATIC=k_static, num_warps=cfg.num_warps,
        )
    else:
        _gemv_kernel[grid](
            x, weight, b, y, n, k, x.stride(0), y.stride(0),
            M=m, HAS_BIAS=bias is not None, SILU_MUL=silu_mul, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            NUM_STAGES=cfg.num_stages, K_STATIC=k_static, num_warps=cfg.num_warps,
        )
    return y


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: GemvConfig | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x [M <= 8, K] -> [M, N] in x's dtype (fp32 accumulation,
    one rounding). ``config`` overrides the table (benchmarks, tests)."""
    return _launch(x, weight, bias, False, config)


def gemv_silu_mul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: GemvConfig | None = None
) -> torch.Tensor:
    """``F.linear(silu_and_mul(x), weight, bias)`` for x [M <= 8, 2K] (gate | up), weight [N, K],
    the activation rounded as ``triton_fused.silu_and_mul`` rounds it -> [M, N]."""
    return _launch(x, weight, bias, True, config)


__all__ = ["FUSED_SILU_MAX_M", "GEMV_MAX_M", "GemvConfig", "config_for", "gemv", "gemv_silu_mul", "use_gemv"]
