"""The fused-epilogue GEMMs of kernels/triton_gemm.py (a measured baseline, not used by the
models: see its docstring) against the unfused path they would replace.

On CUDA the TMA path at the W1 tile shapes; on CPU Triton's interpreter (pointer loads: its
descriptors mishandle bf16) with small tiles. The kernels sum in fp32 in another order than
cuBLAS / the CPU's matmul and round once, then apply the activation with the fused kernels'
roundings, so outputs agree to about an ulp of the dtype, amplified at most by the activation's
slope (< 1.2 for quick_gelu and silu): bounded here by 2 ulps of the output plus the worst-case
fp32 summation error of K products (as tests/test_gemv.py).
"""

from __future__ import annotations

import fused_setup
import pytest
import torch
import torch.nn.functional as F
from fused_setup import interpreter_env  # noqa: F401 (autouse fixture)

DEVICE = fused_setup.setup("kernels.triton_gemm")  # in interpreter mode too on CPU
pytestmark = pytest.mark.gpu

import kernels.triton_gemm as tg  # noqa: E402

import kernels.triton_fused as tf

CUDA = DEVICE == "cuda"
SMALL = tg.GemmConfig(block_m=32, block_n=32, block_k=32, num_stages=1, num_warps=4, group_m=2)
_EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _randn(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def _check(out, ref, bound):
    err = (out.double() - ref.double()).abs()
    tol = 4 * _EPS[out.dtype] * ref.double().abs() + bound + 1e-6
    assert bool((err <= tol).all()), f"max err {err.max().item():.3g}, worst excess {(err - tol).max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m,n,k", [(70, 48, 96), (33, 40, 64), (5, 24, 32)])
@pytest.mark.parametrize("act", ["quick_gelu", "silu", "none"])
def test_linear_act(dtype, m, n, k, act):
    x = _randn(m, k, dtype=dtype, seed=1)
    w = _randn(n, k, dtype=dtype, scale=k**-0.5, seed=2)
    b = _randn(n, dtype=dtype, scale=0.1, seed=3)
    cfg = None if CUDA else SMALL
    out = tg.linear_act(x, w, b, act, cfg)
    lin = F.linear(x, w, b)
    ref = lin if act == "none" else tf.activation(lin, act)
    # fp32 summation error of k products + the bias, times the activation's slope (< 1.2)
    bound = 1.2 * (k + 1) * 2.0**-23 * (x.double().abs() @ w.double().abs().T + b.double().abs())
    _check(out, ref, bound + 1.2 * 2 * _EPS[dtype] * lin.double().abs())
    assert out.shape == (m, n) and out.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m,n,k", [(70, 48, 96), (9, 32, 64)])
def test_gate_up_silu(dtype, m, n, k):
    x = _randn(m, k, dtype=dtype, seed=4)
    w = _randn(2 * n, k, dtype=dtype, scale=k**-0.5, seed=5)
    out = tg.gate_up_silu(x, w, None if CUDA else SMALL)
    h = F.linear(x, w)  # [m, 2n]
    ref = tf.silu_and_mul(h)
    mag = x.double().abs() @ w.double().abs().T  # [m, 2n]
    g, u = h.double().abs().chunk(2, dim=-1)
    # each accumulator's summation error and rounding, through silu(g) * u
    bound = (1.2 * u + 1.2 * g) * (k * 2.0**-23 * (mag[:, :n] + mag[:, n:]) / (g + u + 1e-30) + 2 * _EPS[dtype])
    _check(out, ref, bound)
    assert out.shape == (m, n)


def test_supported():
    x = _randn(16, 64, dtype=torch.bfloat16)
    w = _randn(32, 64, dtype=torch.bfloat16)
    assert tg.supported(x, w, None) == (tg.TensorDescriptor is not None)
    assert not tg.supported(x[:, :60], w[:, :60], None)  # rows not 16-byte multiples / not contiguous
    assert not tg.supported(x, w.float(), None)
