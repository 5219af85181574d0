"""Prefill-sized GEMMs with the activation in the epilogue (Triton, TMA loads on sm_90).

Two products the vision tower and the LM run on every prefill token end in an elementwise op that
cuBLAS cannot fuse, so its output makes a round trip through memory only to be activated:

  * ``linear_act(x, w, b, "quick_gelu")``: ``quick_gelu(x @ w.T + b)`` (Qwen2-VL's / CLIP's ViT
    fc1: [P, 1280] x [5120, 1280]);
  * ``gate_up_silu(x, w)``: ``silu(x @ w[:I].T) * (x @ w[I:].T)`` for a merged gate/up weight
    [2I, K] (the LM's MLP: two accumulators per tile share each loaded tile of x, and the [M, 2I]
    intermediate never exists).

Numerics follow the unfused path: fp32 accumulation, the bias added in fp32 and the sum rounded
once to the dtype (cuBLAS's bias epilogue), then the activation with the roundings of
``kernels.triton_fused._act`` (torch's op sequence). Only the summation order differs from cuBLAS,
as any two GEMM kernels differ (tests/test_gemm_epilogue.py bounds it like the GEMV's tests).

Measured on the H100 (bench/gemm_epilogue_bench.py; bench/results/gemm_epilogue_h100.json with
the activation's exact division and integer rounding, gemm_epilogue_h100_fastact.json with the
hardware ones the fused kernels use now): the plain Triton GEMM alone trails cuBLAS (fc1 at
56,320 rows 1.33 against 1.09 ms), and the epilogue runs after the K loop without overlap. The
ViT's fc1 + quick_gelu stays slower fused (1.53 against cuBLAS + the activation kernel's 1.44
ms); the LM's gate/up + silu is 4% faster (1.53 against 1.59 ms at 16,384 rows), ~16 ms of a W1
run. No model calls these kernels yet: they are the measured baseline for a persistent,
warp-specialised version whose epilogue overlaps the next tile's loads. Launchers allocate only
their output and read shapes from tensors (no host sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton_fused import _act, _round

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: fused_ops keeps cuBLAS
    TensorDescriptor = None


@dataclass(frozen=True)
class GemmConfig:
    """One launch shape: output tile ``block_m x block_n`` (per accumulator), K step ``block_k``."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    num_stages: int = 3
    num_warps: int = 8
    group_m: int = 8


DEFAULT = GemmConfig()
DEFAULT_GATED = GemmConfig(block_m=128, block_n=128, block_k=64, num_stages=3, num_warps=8)

# (epilogue, N, K) -> the best config measured on the H100 (bench/results/gemm_epilogue_h100.json)
TUNED: dict[tuple[str, int, int], GemmConfig] = {
    ("quick_gelu", 5120, 1280): GemmConfig(128, 256, 64, 4, 8),
    ("gate_up_silu", 8960, 1536): GemmConfig(128, 128, 64, 4, 8),
}


@triton.jit
def _gemm_act_kernel(
    a_desc, b_desc, c_desc, bias_ptr, M, N, up_off,
    K: tl.constexpr,
    ACT: tl.constexpr,  # "quick_gelu", "silu", "none"
    GATED: tl.constexpr,  # two accumulators: act(x @ b[n].T) * (x @ b[up_off + n].T)
    HAS_BIAS: tl.constexpr,
    USE_TMA: tl.constexpr,  # descriptors (GPU); else a_desc, b_desc, c_desc are plain pointers
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    # grouped tile order: GROUP_M row tiles sweep the columns together, so B tiles stay in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if USE_TMA:
        dtype = c_desc.dtype
    else:
        dtype = c_desc.dtype.element_ty
    b_rows = up_off + N if GATED else N  # rows of b that exist

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        if USE_TMA:
            a = a_desc.load([off_m, k])  # [BLOCK_M, BLOCK_K]
            b = b_desc.load([off_n, k])  # [BLOCK_N, BLOCK_K]
        else:  # Triton's interpreter (CPU tests): its descriptors mishandle bf16
            kk = k + rk
            a = tl.load(a_desc + rm[:, None].to(tl.int64) * K + kk[None, :],
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(b_desc + rn[:, None].to(tl.int64) * K + kk[None, :],
                        mask=(rn[:, None] < b_rows) & (kk[None, :] < K), other=0.0)
            # the interpreter's dot multiplies bf16 bit patterns as integers: products in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b.T, acc, input_precision=None if USE_TMA else "ieee")
        if GATED:
            if USE_TMA:
                b_up = b_desc.load([up_off + off_n, k])
            else:
                ru = up_off + rn
                b_up = tl.load(b_desc + ru[:, None].to(tl.int64) * K + kk[None, :],
                               mask=(ru[:, None] < b_rows) & (kk[None, :] < K), other=0.0).to(tl.float32)
            acc_up = tl.dot(a, b_up.T, acc_up, input_precision=None if USE_TMA else "ieee")

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    # the GEMM's own output rounding, then the activation's (torch's op-by-op roundings)
    y = _round(acc, dtype)
    if GATED:
        y = _round(_act(y, ACT, dtype) * _round(acc_up, dtype), dtype)
    elif ACT != "none":
        y = _act(y, ACT, dtype)
    if USE_TMA:
        c_desc.store([off_m, off_n], y.to(dtype))
    else:
        tl.store(c_desc + rm[:, None].to(tl.int64) * N + rn[None, :], y.to(dtype),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def _launch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, n: int, up_off: int,
            act: str, gated: bool, cfg: GemmConfig) -> torch.Tensor:
    m, k = x.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    tma = x.is_cuda and TensorDescriptor is not None
    if tma:
        a, b = TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k]), TensorDescriptor.from_tensor(
            w, [cfg.block_n, cfg.block_k])
        c = TensorDescriptor.from_tensor(out, [cfg.block_m, cfg.block_n])
    else:
        a, b, c = x, w, out
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _gemm_act_kernel[grid](
        a, b, c, bias if bias is not None else out, m, n, up_off,
        K=k, ACT=act, GATED=gated, HAS_BIAS=bias is not None, USE_TMA=tma,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )
    return out


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str,
               cfg: GemmConfig | None = None) -> torch.Tensor:
    """``act(x @ weight.T + bias)``; x: [M, K] contiguous, weight: [N, K] contiguous, bias: [N] or
    None, all one dtype; act: "quick_gelu", "silu" or "none". Returns [M, N]."""
    n = weight.shape[0]
    cfg = cfg or TUNED.get((act, n, x.shape[1]), DEFAULT)
    return _launch(x, weight, bias, n, 0, act, False, cfg)


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, cfg: GemmConfig | None = None) -> torch.Tensor:
    """``silu(x @ weight[:I].T) * (x @ weight[I:].T)``; x: [M, K], weight: [2I, K] (gate rows, then
    up rows), both contiguous of one dtype. Returns [M, I]."""
    n = weight.shape[0] // 2
    cfg = cfg or TUNED.get(("gate_up_silu", n, x.shape[1]), DEFAULT_GATED)
    return _launch(x, weight, None, n, n, "silu", True, cfg)


def supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the TMA descriptors accept these tensors: 2-D, contiguous, 16-byte aligned rows."""
    if TensorDescriptor is None or x.dim() != 2 or weight.dim() != 2:
        return False
    if not (x.is_contiguous() and weight.is_contiguous()) or x.dtype != weight.dtype:
        return False
    # TMA: 16-byte aligned base and row pitch for x, weight and the output
    if (x.shape[1] * x.element_size()) % 16 or (weight.shape[0] * x.element_size()) % 32:
        return False
    if x.data_ptr() % 16 or weight.data_ptr() % 16:
        return False
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        return False
    return True
