"""Fused Triton kernels (kernels/triton_fused.py) against their torch references
(kernels/fused_ops.py), on random inputs of many shapes, strided views and special values.

Runs on CUDA when there is a device; otherwise on CPU through Triton's interpreter with small
shapes (see tests/fused_setup.py); skips where triton is not installed.

Tolerances, in ulps of the dtype (the distance between the two values' ordered bit patterns):
  * rotary, vision rotary, the residual add: 0 (bit-equal; products of two fp16/bf16 values are
    exact in fp32 and every rounding is reproduced);
  * quick_gelu, silu_and_mul, silu_mul: 2, and at most 1 for all but 1e-4 of the elements.
    The rounding order is torch's (sigmoid / silu rounded to the dtype, then the product), but
    torch's exp and Triton's differ by a few fp32 ulps: where the fp32 sigmoid sits on a rounding
    tie of the dtype, the rounded intermediates differ by 1 ulp, and the product by up to 2;
  * rms_norm / fused_add_rms_norm: 1 with unit weights (the fp32 sum is reduced in another order);
    2 with weights, for the same reason: a 1-ulp change of the normalised value times the weight;
  * layer_norm / fused_add_layer_norm: 1, weights and biases included (torch rounds the fp32
    ``(x - mean) * rstd * w + b`` once, so a few fp32 ulps of difference in the mean or rstd move
    it by at most one step), counted at the magnitude of the terms: a result that cancels to near
    zero (``x`` close to the mean, or ``w * n`` close to ``-b``) carries an absolute error of a few
    fp32 ulps of ``|w| (|x| + mean(|x|)) rstd + |b|`` in torch as in the kernel (the mean's error
    scales with the row's magnitude; torch's CPU kernel even computes ``x * rstd - mean * rstd``),
    so its error is measured in ulps of the dtype at that magnitude where that is smaller than the
    raw ulp distance;
  * fp32 (the kernels accept it; the models keep torch there): 64 fp32 ulps for exp-based ones,
    8 for the norms (LayerNorm's at the magnitude of its terms, as above), 0 for the rotaries.
The worst errors are printed as a table by the last test (``pytest -s``).
"""

from __future__ import annotations

import fused_setup
import pytest
import torch
import torch.nn.functional as F
from fused_setup import interpreter_env  # noqa: F401 (autouse fixture)

DEVICE = fused_setup.setup()
pytestmark = pytest.mark.gpu

import triton

import kernels.triton_fused as tf
from kernels import fused_ops

CUDA = DEVICE == "cuda"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# kernel -> (fp16/bf16 ulps, fp32 ulps)
TOL = {
    "quick_gelu": (2, 64), "silu_and_mul": (2, 64), "silu_mul": (2, 64),
    "rms_norm(w=1)": (1, 8), "rms_norm": (2, 8), "add_rms_norm": (2, 8), "residual_add": (0, 0),
    "layer_norm": (1, 8), "add_layer_norm": (1, 8),
    "rotary": (0, 0), "vision_rotary": (0, 0),
}
ERRORS: dict[tuple[str, str], dict[str, float]] = {}  # (kernel, dtype) -> worst errors


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns as integers that are monotonic in the value (+0 and -0 both map to 0)."""
    if t.dtype == torch.float32:
        i = t.view(torch.int32).long()
        return torch.where(i < 0, -(2**31) - i, i)
    i = t.view(torch.int16).long()
    return torch.where(i < 0, -(2**15) - i, i)


_MANTISSA = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def _spacing(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dtype's ulp at each magnitude of ``scale`` (fp64), not below its smallest subnormal."""
    fi = torch.finfo(dtype)
    exp = torch.floor(torch.log2(scale.double().clamp_min(fi.tiny)))
    return torch.exp2(exp - _MANTISSA[dtype])


def check(kernel: str, out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """Asserts ``out`` within the kernel's ulp tolerance of ``ref``; records the errors.

    ``scale`` (optional, broadcast to ref): the magnitude of the terms each value is computed
    from; an error is then the smaller of the ulp distance and ``|out - ref|`` in ulps of the
    dtype at ``scale`` (rounded up), for results that cancel to far below their terms."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    assert torch.isfinite(out).all()
    ulps = (_ordered(out) - _ordered(ref)).abs()
    if scale is not None:
        at_scale = ((out.double() - ref.double()).abs() / _spacing(scale, out.dtype)).ceil().long()
        ulps = torch.minimum(ulps, at_scale)
    worst = int(ulps.max()) if ulps.numel() else 0
    diff = (out.double() - ref.double()).abs()
    rel = (diff.max() / ref.double().abs().max().clamp_min(1e-30)).item() if ulps.numel() else 0.0
    dname = {v: k for k, v in DTYPES.items()}[out.dtype]
    rec = ERRORS.setdefault((kernel, dname), {"cases": 0, "ulp": 0, "rel": 0.0, "differ": 0, "over1": 0, "n": 0})
    rec["cases"] += 1
    rec["ulp"] = max(rec["ulp"], worst)
    rec["rel"] = max(rec["rel"], rel)
    rec["differ"] += int((ulps > 0).sum())
    rec["over1"] += int((ulps > 1).sum())
    rec["n"] += ulps.numel()
    tol = TOL[kernel][1 if out.dtype == torch.float32 else 0]
    assert worst <= tol, f"{kernel} {dname}: {worst} ulps (tolerance {tol}), rel err {rel:.2e}"


def randn(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def _swap(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((b, a), dim=-1)


# Shapes: the interpreter runs one program at a time (~10 ms each), so CPU runs use few rows.
ROWS = [1, 3] if not CUDA else [1, 7, 1031, 4099]
WIDE_ROWS = [1] if not CUDA else [1, 7, 1031]  # rows of widths above 2048
ALL_DTYPES = pytest.mark.parametrize("dname", list(DTYPES))


def _rows_for(width: int) -> list[int]:
    return ROWS if width <= 2048 else WIDE_ROWS


# -- activations ----------------------------------------------------------------------------------


@ALL_DTYPES
@pytest.mark.parametrize("width", [80, 1176, 1280, 5120, 8960])
def test_quick_gelu(dname, width):
    dtype = DTYPES[dname]
    for i, rows in enumerate(_rows_for(width)):
        x = randn(rows, width, dtype=dtype, scale=3.0, seed=i)
        check("quick_gelu", tf.quick_gelu(x), x * torch.sigmoid(1.702 * x))
    # strided rows (a column slice of a wider buffer) and a 3-D input
    x = randn(2, width + 48, dtype=dtype, scale=3.0, seed=9)[:, 16 : 16 + width]
    check("quick_gelu", tf.quick_gelu(x), x * torch.sigmoid(1.702 * x))
    x = randn(1, 2, width, dtype=dtype, scale=3.0, seed=10)
    check("quick_gelu", tf.quick_gelu(x), x * torch.sigmoid(1.702 * x))


@ALL_DTYPES
@pytest.mark.parametrize("inter", [64, 1176, 1536, 8960])
def test_silu_and_mul(dname, inter):
    dtype = DTYPES[dname]
    for i, rows in enumerate(_rows_for(inter)):
        x = randn(rows, 2 * inter, dtype=dtype, scale=3.0, seed=i)
        gate, up = x.chunk(2, dim=-1)
        check("silu_and_mul", tf.silu_and_mul(x), F.silu(gate) * up)
    x = randn(2, 2 * inter + 32, dtype=dtype, scale=3.0, seed=7)[:, : 2 * inter]  # row stride 2I + 32
    gate, up = x.chunk(2, dim=-1)
    check("silu_and_mul", tf.silu_and_mul(x), F.silu(gate) * up)
    # separate projections (Qwen2.5-VL's vision MLP), both strided
    g = randn(2, inter + 16, dtype=dtype, scale=3.0, seed=8)[:, 16:]
    u = randn(2, inter + 8, dtype=dtype, scale=3.0, seed=9)[:, :inter]
    check("silu_mul", tf.act_and_mul(g, u, "silu"), F.silu(g) * u)


# -- RMSNorm --------------------------------------------------------------------------------------


def _rms_ref(x, w, eps):
    return fused_ops._rms_norm_ref(x, w, eps)


@ALL_DTYPES
@pytest.mark.parametrize("width", [64, 1176, 1280, 1536, 3584, 8192] + ([8960, 16384] if CUDA else []))
def test_rms_norm(dname, width):
    dtype = DTYPES[dname]
    eps = 1e-6
    w = (1 + 0.3 * randn(width, dtype=torch.float32, seed=100)).to(dtype)
    ones = torch.ones(width, device=DEVICE, dtype=dtype)
    for i, rows in enumerate(ROWS):
        x = randn(rows, width, dtype=dtype, scale=2.0, seed=i)
        check("rms_norm(w=1)", tf.rms_norm(x, ones, eps), _rms_ref(x, ones, eps))
        check("rms_norm", tf.rms_norm(x, w, eps), _rms_ref(x, w, eps))
        h = randn(rows, width, dtype=dtype, scale=2.0, seed=50 + i)
        normed, res = tf.fused_add_rms_norm(h, x, w, eps)
        ref_res = x + h
        check("residual_add", res, ref_res)
        check("add_rms_norm", normed, _rms_ref(ref_res, w, eps))
    # strided rows: two overlapping slices of a wider buffer
    base = randn(2, width + 64, dtype=dtype, scale=2.0, seed=77)
    x, h = base[:, :width], base[:, 64:]
    check("rms_norm", tf.rms_norm(x, w, eps), _rms_ref(x, w, eps))
    normed, res = tf.fused_add_rms_norm(h, x, w, eps)
    check("residual_add", res, x + h)
    check("add_rms_norm", normed, _rms_ref(x + h, w, eps))


def test_rms_norm_3d_and_empty():
    x = randn(2, 3, 1536, dtype=torch.bfloat16, seed=3)
    w = (1 + 0.3 * randn(1536, dtype=torch.float32, seed=4)).bfloat16()
    check("rms_norm", tf.rms_norm(x, w, 1e-5), _rms_ref(x, w, 1e-5))
    empty = torch.empty(0, 1536, device=DEVICE, dtype=torch.bfloat16)
    assert tf.rms_norm(empty, w, 1e-6).shape == (0, 1536)
    n, r = tf.fused_add_rms_norm(empty, empty, w, 1e-6)
    assert n.shape == r.shape == (0, 1536)


# -- LayerNorm ------------------------------------------------------------------------------------


def _ln_ref(x, w, b, eps):
    return F.layer_norm(x, x.shape[-1:], w, b, eps)


def _ln_scale(x, w, b, eps):
    """|w| (|x| + mean(|x|)) rstd + |b| in fp64: the magnitude of the terms of each LayerNorm
    output (the mean's rounding error scales with the row's mean magnitude, not the mean)."""
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    rstd = torch.rsqrt(((xd - mean) ** 2).mean(-1, keepdim=True) + eps)
    scale = w.double().abs() * (xd.abs() + xd.abs().mean(-1, keepdim=True)) * rstd
    return scale + b.double().abs() if b is not None else scale


def _check_ln(x, w, b, eps, residual=None):
    """The fused kernel (``residual`` given) or the plain one against torch's ``x + residual``
    (bit-equal) and ``F.layer_norm`` of that rounded sum."""
    if residual is None:
        check("layer_norm", tf.layer_norm(x, w, b, eps), _ln_ref(x, w, b, eps), _ln_scale(x, w, b, eps))
        return
    normed, res = tf.fused_add_layer_norm(x, residual, w, b, eps)
    ref_res = x + residual
    check("residual_add", res, ref_res)
    check("add_layer_norm", normed, _ln_ref(ref_res, w, b, eps), _ln_scale(ref_res, w, b, eps))


# Narrow rows pack several to a program (80 -> 8 rows of 128): row counts that leave one partial.
LN_ROWS = [1, 3, 17] if not CUDA else [1, 7, 1031, 4099]


@ALL_DTYPES
@pytest.mark.parametrize("width", [80, 1176, 1280, 1536, 5120, 8192])
def test_layer_norm(dname, width):
    dtype = DTYPES[dname]
    eps = 1e-6
    w = (1 + 0.3 * randn(width, dtype=torch.float32, seed=100)).to(dtype)
    b = (0.1 * randn(width, dtype=torch.float32, seed=101)).to(dtype)
    ones = torch.ones(width, device=DEVICE, dtype=dtype)
    for i, rows in enumerate(LN_ROWS if width <= 2048 else WIDE_ROWS):
        # an offset mean, as a residual stream has: the kernel centres before squaring
        x = randn(rows, width, dtype=torch.float32, scale=2.0, seed=i).add_(0.5).to(dtype)
        h = randn(rows, width, dtype=dtype, scale=2.0, seed=50 + i)
        _check_ln(x, w, b, eps)
        _check_ln(x, ones, None, eps)
        _check_ln(h, w, b, eps, residual=x)
        _check_ln(h, w, None, 1e-5, residual=x)
    # strided rows: two overlapping slices of a wider buffer (x, then the residual)
    base = randn(3, width + 64, dtype=dtype, scale=2.0, seed=77)
    x, h = base[:, :width], base[:, 64:]
    _check_ln(x, w, b, eps)
    _check_ln(h, w, b, eps, residual=x)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf / nan arithmetic
def test_layer_norm_3d_empty_and_edge_rows():
    dtype = torch.bfloat16
    w = (1 + 0.3 * randn(1280, dtype=torch.float32, seed=4)).to(dtype)
    b = (0.1 * randn(1280, dtype=torch.float32, seed=5)).to(dtype)
    x, h = randn(2, 3, 1280, dtype=dtype, seed=3), randn(2, 3, 1280, dtype=dtype, seed=6)
    _check_ln(x, w, b, 1e-6)
    _check_ln(h, w, b, 1e-6, residual=x)
    empty = torch.empty(0, 1280, device=DEVICE, dtype=dtype)
    assert tf.layer_norm(empty, w, b, 1e-6).shape == (0, 1280)
    n, r = tf.fused_add_layer_norm(empty, empty, w, b, 1e-6)
    assert n.shape == r.shape == (0, 1280)
    for dname in ("bf16", "fp16"):
        dtype = DTYPES[dname]
        w, b = w.to(dtype), b.to(dtype)
        # constant rows: variance 0, the output is exactly the bias, as an exact mean gives (torch's
        # CPU kernel computes x * rstd - mean * rstd from a mean a rounding off: 6e-5 here)
        const = torch.full((2, 1280), 3.0, device=DEVICE, dtype=dtype)
        got = tf.layer_norm(const, w, b, 1e-6)
        if DEVICE == "cpu":  # the interpreter's exact arithmetic gives the bias bit for bit
            assert torch.equal(got, b.expand(2, -1))
        else:  # the GPU's approximate rsqrt of eps times a zero that rounds: within one ulp of it
            torch.testing.assert_close(got, b.expand(2, -1), rtol=2**-7, atol=1e-3)
        # a large offset (mean 300, std 1: x - mean cancels), large magnitudes (fp16: x^2 is far
        # beyond its range; the kernel squares in fp32)
        offset = randn(2, 1280, dtype=torch.float32, seed=8).add_(300).to(dtype)
        big = randn(2, 1280, dtype=torch.float32, scale=2e4, seed=9).clamp(-6e4, 6e4).to(dtype)
        for x in (offset, big):
            _check_ln(x, w, b, 1e-6)
            _check_ln(x, w, b, 1e-6, residual=-0.5 * x)
        # inf / nan in a row: nan rows, as torch's; the other rows untouched by them
        bad = randn(3, 1280, dtype=dtype, seed=10)
        bad[0, 7], bad[1, 100] = float("inf"), float("nan")
        ref = _ln_ref(bad, w, b, 1e-6)
        out = tf.layer_norm(bad, w, b, 1e-6)
        assert torch.isnan(out[:2]).all() and torch.isnan(ref[:2]).all()
        check("layer_norm", out[2:], ref[2:], _ln_scale(bad[2:], w, b, 1e-6))


# -- rotary ---------------------------------------------------------------------------------------


def _tables(n, head_dim, dtype, seed, positions_max=4096):
    """cos and signed sin [n, 1, head_dim] as RotaryEmbedding.table builds them (fp32 -> dtype)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, positions_max, (n,), generator=g).float()
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat([torch.outer(pos, inv_freq)] * 2, dim=-1)
    sin = emb.sin()
    sin_signed = torch.cat((-sin[:, : head_dim // 2], sin[:, head_dim // 2 :]), dim=-1)
    return (emb.cos().to(DEVICE, dtype)[:, None, :], sin_signed.to(DEVICE, dtype)[:, None, :])


# (q heads, kv heads): GQA groups 2 / 6 / 4 / 1; 32 + 8 heads of 128 need two head blocks
HEADS = [(4, 2), (12, 2), (32, 8)] + ([(16, 16), (28, 4)] if CUDA else [])


@ALL_DTYPES
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("heads", HEADS)
def test_rotary_on_merged_qkv(dname, head_dim, heads):
    dtype = DTYPES[dname]
    num_heads, num_kv = heads
    for i, n in enumerate([1, 3] if not CUDA else [1, 13, 1031, 4099]):
        qkv = randn(n, (num_heads + 2 * num_kv) * head_dim, dtype=dtype, scale=2.0, seed=i)
        # q|k heads: a strided view (row stride includes v), as LlamaAttention passes it
        x = qkv[:, : (num_heads + num_kv) * head_dim].view(n, num_heads + num_kv, head_dim)
        cos, sin = _tables(n, head_dim, dtype, seed=i)
        check("rotary", tf.rotary(x, cos, sin), x * cos + _swap(x) * sin)


@ALL_DTYPES
@pytest.mark.parametrize("head_dim", [64, 80])
def test_rotary_arbitrary_tables_and_in_place(dname, head_dim):
    dtype = DTYPES[dname]
    x = randn(3, 6, head_dim, dtype=dtype, scale=2.0, seed=1)
    cos, sin = (randn(3, 1, head_dim, dtype=dtype, seed=20 + j) for j in range(2))  # halves differ
    ref = x * cos + _swap(x) * sin
    check("rotary", tf.rotary(x, cos, sin), ref)
    check("rotary", tf.rotary(x, cos[:, 0], sin[:, 0]), ref)  # [N, D] tables
    y = x.clone()
    assert tf.rotary(y, cos, sin, out=y) is y
    check("rotary", y, ref)


@ALL_DTYPES
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("num_heads", [4, 16, 20])  # 2 x 20 heads of 128: two row blocks
def test_vision_rotary(dname, head_dim, num_heads):
    dtype = DTYPES[dname]
    for i, p in enumerate([1, 4] if not CUDA else [1, 1031, 4096]):
        # qkv from a wider buffer: row stride larger than 3 * H * D
        buf = randn(p, 3 * num_heads * head_dim + 32, dtype=dtype, scale=2.0, seed=i)
        qkv = buf[:, : 3 * num_heads * head_dim].view(p, 3, num_heads, head_dim)
        ang = randn(p, head_dim // 2, dtype=torch.float32, scale=20.0, seed=40 + i)
        cos = torch.cat((ang, ang), dim=-1).cos()
        sin = torch.cat((-ang.sin(), ang.sin()), dim=-1)
        qk = qkv[:, :2].float()
        ref = (qk * cos[:, None, None] + _swap(qk) * sin[:, None, None]).to(dtype)
        q, k = tf.vision_rotary(qkv, cos, sin)
        assert q.is_contiguous() and k.is_contiguous()
        check("vision_rotary", q, ref[:, 0])
        check("vision_rotary", k, ref[:, 1])


# -- special values ---------------------------------------------------------------------------------


def _specials(dtype) -> torch.Tensor:
    fi = torch.finfo(dtype)
    vals = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), fi.max, -fi.max, 1.0, -2.5,
            1e4 if dtype != torch.float16 else 6e4]
    # smallest normals and subnormals; not for bf16 in the interpreter, whose bf16 <-> fp32 casts
    # flush subnormals (the GPU's casts do not)
    if CUDA or dtype != torch.bfloat16:
        vals += [fi.tiny, -fi.tiny, fi.tiny / 4, -fi.tiny / 8]
    return torch.tensor(vals, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf / nan arithmetic
@pytest.mark.parametrize("dname", ["bf16", "fp16"])
def test_special_values(dname):
    """inf, nan, the largest finite values (their sums round to inf), subnormals and signed zeros
    go through the dtype rounding as torch's: bit-equal, nan where torch has nan."""
    dtype = DTYPES[dname]
    v = _specials(dtype)
    n = v.numel()
    a = v[None, :].expand(n, n).contiguous()  # every pair (a, b)
    b = v[:, None].expand(n, n).contiguous()
    w = torch.ones(n, device=DEVICE, dtype=dtype)
    _, res = tf.fused_add_rms_norm(a, b, w, 1e-6)
    torch.testing.assert_close(res, b + a, rtol=0, atol=0, equal_nan=True)
    # rotary: x, cos, sin from the specials (head_dim = 2 * n)
    x = torch.cat((a, b), dim=-1)[:, None, :]  # [n, 1, 2n]
    cos = torch.cat((b, b), dim=-1)[:, None, :]
    sin = torch.cat((a.flip(0), b.flip(1)), dim=-1)[:, None, :]
    torch.testing.assert_close(tf.rotary(x, cos, sin), x * cos + _swap(x) * sin, rtol=0, atol=0, equal_nan=True)
    # activations at the special points: nan / inf placement and the exact values around them
    torch.testing.assert_close(tf.quick_gelu(a), a * torch.sigmoid(1.702 * a), rtol=0, atol=0, equal_nan=True)
    gu = torch.cat((a, b), dim=-1)
    torch.testing.assert_close(tf.silu_and_mul(gu), F.silu(a) * b, rtol=0, atol=0, equal_nan=True)


# -- sm_90 compile check (CPU machines) ------------------------------------------------------------

_SM90_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.triton_fused as tf

b, f, i = "*bf16", "*fp32", "i32"
cases = [
    (tf._act_kernel, [b, b, i, i, i], dict(ACT="quick_gelu", BLOCK=1024), {}),
    (tf._gated_kernel, [b, b, b, i, i, i, i], dict(ACT="silu", BLOCK=1024), {}),
    (tf._rms_norm_kernel, [b] * 5 + [i] * 5 + ["fp32"], dict(HAS_RESIDUAL=True, BLOCK=8192), dict(num_warps=8)),
    (tf._layer_norm_kernel, [b] * 6 + [i] * 6 + ["fp32"],
     dict(HAS_RESIDUAL=True, HAS_BIAS=True, BLOCK_M=1, BLOCK_N=2048), dict(num_warps=4)),
    (tf._layer_norm_kernel, [b] * 6 + [i] * 6 + ["fp32"],
     dict(HAS_RESIDUAL=True, HAS_BIAS=True, BLOCK_M=1, BLOCK_N=8192), dict(num_warps=8)),
    (tf._layer_norm_kernel, [b] * 6 + [i] * 6 + ["fp32"],
     dict(HAS_RESIDUAL=False, HAS_BIAS=False, BLOCK_M=8, BLOCK_N=128), dict(num_warps=4)),
    (tf._rotary_kernel, [b] * 4 + [i] * 7, dict(HALF=40, BLOCK_H=32, BLOCK_HALF=64), dict(enable_fp_fusion=False)),
    (tf._vision_rotary_kernel, [b, f, f, b] + [i] * 7, dict(HALF=40, BLOCK_R=32, BLOCK_HALF=64),
     dict(enable_fp_fusion=False)),
]
for fn, types, const, opts in cases:
    names = [n for n in fn.arg_names if n not in const]
    sig = dict(zip(names, types)) | {k: "constexpr" for k in const}
    out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32), options=opts)
    assert out.asm.get("cubin"), fn.fn.__name__

# LayerNorm at Qwen2-VL's vision width, specialised as a launch on contiguous 1280-wide rows is
# (16-byte aligned pointers, n_cols and row strides divisible by 16): 16-byte vector loads/stores
fn = tf._layer_norm_kernel
const = dict(HAS_RESIDUAL=True, HAS_BIAS=True, BLOCK_M=1, BLOCK_N=2048)
names = [n for n in fn.arg_names if n not in const]
sig = dict(zip(names, [b] * 6 + [i] * 6 + ["fp32"])) | {k: "constexpr" for k in const}
attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names if n not in ("n_rows", "eps")}
out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                     options=dict(num_warps=4))
ptx = out.asm["ptx"]
assert "ld.global.v4" in ptx and "st.global.v4" in ptx and "ld.global.b16" not in ptx, "layer norm: scalar accesses"
print("compiled", len(cases) + 1)
"""


@pytest.mark.skipif(CUDA, reason="the CUDA tests compile these kernels for the device at hand")
def test_kernels_compile_for_sm90():
    """Compiles every kernel (bf16) for an H100 (sm_90) through ptxas, without a GPU: catches what
    the interpreter does not check (types, layouts) before a GPU run. In a fresh process, since
    this one has triton in interpreter mode."""
    fused_setup.compile_for_sm90(_SM90_SCRIPT)


# -- report ---------------------------------------------------------------------------------------


def test_zz_report_worst_errors():
    """Prints the worst errors per (kernel, dtype) (visible with pytest -s)."""
    if not ERRORS:
        pytest.skip("no kernel test ran")
    dev = torch.cuda.get_device_name() if CUDA else "cpu (triton interpreter)"
    lines = [
        f"Fused kernels vs their torch references on {dev} (torch {torch.__version__}, triton {triton.__version__})",
        ("ulps: max distance in units of the dtype's last place; rel: max|out - ref| / max|ref|; "
         "differ / > 1 ulp: share of elements not bit-equal / more than one ulp apart"),
        "",
        "| kernel | dtype | cases | elements | max ulps | tolerance | max rel err | differ | > 1 ulp |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (kernel, dname), r in sorted(ERRORS.items()):
        tol = TOL[kernel][1 if dname == "fp32" else 0]
        n = max(r["n"], 1)
        lines.append(f"| {kernel} | {dname} | {r['cases']} | {r['n']} | {r['ulp']} | {tol} | {r['rel']:.2e} | "
                     f"{r['differ'] / n:.1e} | {r['over1'] / n:.1e} |")
    print("\n" + "\n".join(lines))
    for (kernel, dname), r in ERRORS.items():
        if dname != "fp32":  # two ulps only where an intermediate sat on a rounding tie
            assert r["over1"] <= 1e-4 * r["n"], (kernel, dname, r)
