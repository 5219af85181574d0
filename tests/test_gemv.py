"""The skinny-M Triton GEMV (kernels/triton_gemv.py) and its dispatch (fused_ops.linear,
fused_ops.silu_and_mul_linear).

Runs on CUDA when there is a device; otherwise on CPU through Triton's interpreter, with fewer
shapes (see tests/fused_setup.py); skips where triton is not installed.

Accuracy criterion, against an fp64 reference ``x @ w.T + b`` of the same (dtype) inputs: the
kernels sum in fp32 (in some order) and round once, so for every element

    |out - ref| <= ulp(max(|out|, |ref|)) + (K + 1) * 2^-23 * (|x| @ |w|.T + |b|)

the first term the final rounding (half an ulp, doubled so that a value on a binade edge is
covered), the second the worst-case bound of an fp32 sum of K products and the bias (products of
two fp16/bf16 values are exact in fp32), with one fp32 ulp per addition rather than half: the
tensor cores' fp32 accumulation need not round to nearest. In practice that term is far below one
ulp of the dtype: the printed table shows the max error in ulps of the dtype at |ref| (above 1
only where the result cancels to far below its terms) and the max relative error. ``gemv_silu_mul`` must equal ``gemv(silu_and_mul(x))`` bit for bit (the same
activation rounding and the same summation order).
"""

from __future__ import annotations

import fused_setup
import pytest
import torch
import torch.nn.functional as F
from fused_setup import interpreter_env  # noqa: F401 (autouse fixture)

DEVICE = fused_setup.setup("kernels.triton_gemv")  # in interpreter mode too on CPU
pytestmark = pytest.mark.gpu

import kernels.triton_gemv as tg  # noqa: E402

import kernels.triton_fused as tf
from kernels import fused_ops

CUDA = DEVICE == "cuda"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_MANTISSA = {torch.float16: 10, torch.bfloat16: 7}
ERRORS: dict[tuple[str, str], dict[str, float]] = {}  # (kernel, dtype) -> worst errors
# The interpreter runs one program at a time: on CPU, shapes with many columns use wide blocks.
WIDE = tg.GemvConfig(block_n=256, block_k=512, num_warps=4, num_stages=1)


def randn(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def _spacing(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dtype's ulp at each magnitude of ``v`` (fp64), not below its smallest subnormal."""
    fi = torch.finfo(dtype)
    exp = torch.floor(torch.log2(v.abs().double().clamp_min(fi.tiny)))
    return torch.exp2(exp - _MANTISSA[dtype])


def check(kernel: str, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """Asserts the criterion of the module docstring for ``out`` ~ ``x @ w.T + b``; records errors."""
    xd, wd = x.double(), w.double()
    ref = xd @ wd.T + (b.double() if b is not None else 0.0)
    mag = xd.abs() @ wd.abs().T + (b.double().abs() if b is not None else 0.0)
    assert out.shape == ref.shape and out.dtype == x.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs()
    k = x.shape[1]
    tol = _spacing(torch.maximum(out.double().abs(), ref.abs()), out.dtype) + (k + 1) * 2.0**-23 * mag
    ulps = (err / _spacing(ref, out.dtype)).max().item() if err.numel() else 0.0
    rel = (err.max() / ref.abs().max().clamp_min(1e-30)).item() if err.numel() else 0.0
    dname = {v: k for k, v in DTYPES.items()}[out.dtype]
    rec = ERRORS.setdefault((kernel, dname), {"cases": 0, "ulp": 0.0, "rel": 0.0})
    rec["cases"] += 1
    rec["ulp"], rec["rel"] = max(rec["ulp"], ulps), max(rec["rel"], rel)
    bad = err > tol
    assert not bad.any(), f"{kernel} {dname} {tuple(x.shape)}x{tuple(w.shape)}: {int(bad.sum())} elements off, " \
                          f"worst {(err - tol).max().item():.3e} over; {ulps:.2f} ulps, rel {rel:.2e}"


def _cases() -> list[tuple[int, int, int, str, bool]]:
    """(M, N, K, dtype, bias). CUDA: every (N, K), M cycling through 1, 2, 3, 5, 8, dtypes and
    bias alternating, and every (M, dtype, bias) on two shapes (each distinct config compiles a
    kernel: the full cross product would mostly time the compiler). CPU: a subset."""
    if CUDA:
        cases, i = [], 0
        for n in (1, 7, 64, 1536, 2048, 4100):
            for k in (16, 96, 1536, 1000):
                cases.append(((1, 2, 3, 5, 8)[i % 5], n, k, ("bf16", "fp16")[i % 2], (i // 2) % 2 == 0))
                i += 1
        for n, k in ((1536, 1536), (4100, 1000)):
            cases += [(m, n, k, d, b) for m in (1, 2, 3, 5, 8) for d in DTYPES for b in (False, True)]
        return cases
    return [(1, 1, 16, "bf16", True), (2, 7, 96, "fp16", False), (3, 64, 1000, "bf16", True),
            (5, 1536, 96, "fp16", True), (8, 2048, 16, "bf16", False), (1, 4100, 1536, "fp16", True),
            (8, 64, 1536, "fp16", True), (1, 1536, 1000, "bf16", False)]


def _data(m, n, k, dname, bias, seed, silu=False):
    dtype = DTYPES[dname]
    width = 2 * k if silu else k
    x = randn(m, width + 24, dtype=dtype, scale=2.0, seed=seed)[:, 8 : 8 + width]  # row stride width + 24
    w = randn(n, k, dtype=dtype, scale=k**-0.5, seed=seed + 1)
    b = randn(n, dtype=dtype, seed=seed + 2) if bias else None
    return x, w, b


@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-{c[3]}-{'bias' if c[4] else 'nobias'}")
def test_gemv_vs_fp64(case):
    m, n, k, dname, bias = case
    x, w, b = _data(m, n, k, dname, bias, seed=m * 7 + n + k)
    cfg = None if CUDA or n <= 256 else WIDE
    check("gemv", tg.gemv(x, w, b, config=cfg), x, w, b)


CONFIGS = [tg.GemvConfig(2, 64, 1, 1), tg.GemvConfig(4, 64, 2, 3), tg.GemvConfig(8, 128, 4, 2),
           tg.GemvConfig(16, 64, 4, 3, dot=True), tg.GemvConfig(64, 128, 4, 4, dot=True)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_gemv_configs(cfg):
    """Explicit configs, both kernels: tails in N and K of every size, one block of K, pipelined
    or not; the fused activation bit-identical to the activation kernel then the GEMV."""
    for i, (m, n, k) in enumerate([(1, 37, 16), (3, 70, 200), (8, 33, 130)]):
        for dname in DTYPES:
            x, w, b = _data(m, n, k, dname, i % 2 == 0, seed=100 + i)
            check("gemv", tg.gemv(x, w, b, config=cfg), x, w, b)
        if i == 1 and not CUDA:
            continue  # the interpreter's slowest case
        xs, w, b = _data(m, n, k, "bf16", i % 2 == 1, seed=200 + i, silu=True)
        assert torch.equal(tg.gemv_silu_mul(xs, w, b, config=cfg), tg.gemv(tf.silu_and_mul(xs), w, b, config=cfg))


SILU_CASES = ([(1, 1536, 8960), (2, 64, 1000), (5, 2048, 96), (8, 7, 1536), (3, 4100, 16)] if CUDA
              else [(1, 64, 1000), (3, 7, 96), (8, 300, 160)])


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("shape", SILU_CASES, ids=lambda s: "M{}-N{}-K{}".format(*s))
def test_gemv_silu_mul_bit_identical(shape, dname):
    m, n, k = shape
    for bias in (False, True):
        x, w, b = _data(m, n, k, dname, bias, seed=m + n + k, silu=True)
        x.mul_(1.5)  # gate values around +-3: the whole silu curve
        cfg = None if CUDA or n <= 256 else WIDE
        got = tg.gemv_silu_mul(x, w, b, config=cfg)
        act = tf.silu_and_mul(x)
        assert torch.equal(got, tg.gemv(act, w, b, config=cfg)), (shape, dname, bias)
        check("gemv_silu_mul", got, act, w, b)


# -- dispatch --------------------------------------------------------------------------------------


@pytest.fixture
def fused_on(monkeypatch):
    """Fused kernels enabled (forced onto CPU tensors in the interpreter); counts GEMV launches."""
    calls: dict[str, int] = {}
    for name in ("gemv", "gemv_silu_mul"):
        fn = getattr(tg, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **k)

        monkeypatch.setattr(tg, name, wrapped)
    fused_ops.set_enabled(True)
    fused_ops.force_cpu_triton(not CUDA)
    try:
        yield calls
    finally:
        fused_ops.force_cpu_triton(False)
        fused_ops.set_enabled(None)


def test_linear_dispatch(fused_on):
    calls = fused_on
    bf = torch.bfloat16
    x, w, b = _data(1, 48, 64, "bf16", True, seed=1)
    y = fused_ops.linear(x, w, b)
    assert calls == {"gemv": 1}
    check("gemv", y, x, w, b)
    calls.clear()
    # torch's F.linear, bit for bit: fp32, more than 8 rows, a transposed (non-contiguous) weight,
    # a 3-D input, a column-strided input
    x32, w32 = x.float(), w.float()
    w_t = randn(64, 48, dtype=bf, seed=2).t()
    x9 = randn(9, 64, dtype=bf, seed=3)
    xs = randn(1, 128, dtype=bf, seed=4)[:, ::2]
    x3 = randn(1, 2, 64, dtype=bf, seed=5)
    for args in [(x32, w32, b.float()), (x9, w, b), (x, w_t, b), (x3, w, b), (xs, w, None)]:
        assert torch.equal(fused_ops.linear(*args), F.linear(*args))
    assert calls == {}
    # weight or bias of another dtype (which F.linear itself refuses): not the GEMV
    assert fused_ops._gemv(x, w32, None, 64) is None and fused_ops._gemv(x, w, b.float(), 64) is None
    assert fused_ops._gemv(x, w, b, 64) is tg
    # the tuning table: shapes and row counts where cuBLAS measured faster keep it; shapes not in
    # the table take the GEMV up to HEURISTIC_MAX_M rows
    w_o = torch.empty(1536, 1536, dtype=bf, device=DEVICE)
    assert fused_ops._gemv(torch.empty(1, 1536, dtype=bf, device=DEVICE), w_o, None, 1536) is tg
    assert fused_ops._gemv(torch.empty(8, 1536, dtype=bf, device=DEVICE), w_o, None, 1536) is None
    assert fused_ops._gemv(x9[:2], w, None, 64) is None and tg.HEURISTIC_MAX_M < 2
    fused_ops.set_enabled(False)
    assert torch.equal(fused_ops.linear(x, w, b), F.linear(x, w, b))
    assert calls == {}


def test_silu_and_mul_linear_dispatch(fused_on, monkeypatch):
    calls = fused_on
    x, w, b = _data(1, 40, 96, "bf16", True, seed=6, silu=True)
    y = fused_ops.silu_and_mul_linear(x, w, b)
    assert calls == {"gemv_silu_mul": 1}
    assert torch.equal(y, tg.gemv(fused_ops.silu_and_mul(x), w, b))
    calls.clear()
    monkeypatch.setattr(tg, "FUSED_SILU_MAX_M", 0)  # above it: the activation kernel, then the GEMV
    assert torch.equal(fused_ops.silu_and_mul_linear(x, w, b), y)
    assert calls == {"gemv": 1}
    calls.clear()
    x9 = randn(9, 192, dtype=torch.bfloat16, seed=7)
    for xx in (x9, x.float()):
        ww, bb = w.to(xx.dtype), b.to(xx.dtype)
        assert torch.equal(fused_ops.silu_and_mul_linear(xx, ww, bb), F.linear(fused_ops.silu_and_mul(xx), ww, bb))
    monkeypatch.setattr(fused_ops, "_gemv_mod", False)  # the GEMV module failed to import: torch
    assert torch.equal(fused_ops.silu_and_mul_linear(x, w, b), F.linear(fused_ops.silu_and_mul(x), w, b))
    assert calls == {}


def test_empty_and_single_column():
    x = randn(3, 32, dtype=torch.bfloat16, seed=8)
    assert tg.gemv(x, torch.empty(0, 32, dtype=torch.bfloat16, device=DEVICE)).shape == (3, 0)
    w = randn(1, 32, dtype=torch.bfloat16, seed=9)
    check("gemv", tg.gemv(x, w), x, w, None)


_SM90_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.triton_gemv as tg

fn = tg._gemv_kernel
for m, silu, bias, stages in [(1, False, True, 1), (1, False, False, 3), (1, True, False, 3), (8, True, True, 3)]:
    cfg = tg.config_for(m, 1536, 8960)
    const = dict(M=m, HAS_BIAS=bias, SILU_MUL=silu, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NUM_STAGES=stages,
                 K_STATIC=0)
    names = [n for n in fn.arg_names if n not in const]
    sig = dict(zip(names, ["*bf16"] * 4 + ["i32"] * 4)) | {k: "constexpr" for k in const}
    # specialised as a launch on Qwen2-VL's shapes is: 16-byte aligned pointers, 16-divisible ints
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}
    out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                         target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg.num_warps))
    ptx = out.asm["ptx"]
    if stages == 1:  # the weight streams in 16-byte loads
        assert "evict_first" in ptx and ".v4.b32" in ptx, "gemv: no 16-byte weight loads"
    else:  # software-pipelined: cp.async prefetch
        assert "cp.async" in ptx, "gemv: loop not pipelined"
fn = tg._gemv_dot_kernel  # the tensor-core kernel: M at run time
const = dict(HAS_BIAS=True, SILU_MUL=False, BLOCK_N=64, BLOCK_K=256, NUM_STAGES=4, K_STATIC=0)
names = [n for n in fn.arg_names if n not in const]
sig = dict(zip(names, ["*bf16"] * 4 + ["i32"] * 5)) | {k: "constexpr" for k in const}
attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names if n != "M"}
out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                     options=dict(num_warps=4))
assert "mma" in out.asm["ptx"] and "cp.async" in out.asm["ptx"], "gemv dot: no tensor cores or no pipelining"
print("compiled")
"""


@pytest.mark.skipif(CUDA, reason="the CUDA tests compile these kernels for the device at hand")
def test_gemv_compiles_for_sm90():
    """Compiles the GEMV for an H100 (sm_90) through ptxas without a GPU (in a fresh process: this
    one has triton in interpreter mode): vector weight loads, and the pipelined loop."""
    fused_setup.compile_for_sm90(_SM90_SCRIPT)


def test_zz_report_worst_errors():
    """Prints the worst errors per (kernel, dtype) (visible with pytest -s)."""
    if not ERRORS:
        pytest.skip("no kernel test ran")
    dev = torch.cuda.get_device_name() if CUDA else "cpu (triton interpreter)"
    lines = [f"GEMV vs fp64 reference on {dev}: max |out - ref| in ulps of the dtype at |ref|, max relative error",
             "| kernel | dtype | cases | max ulps | max rel err |", "| --- | --- | --- | --- | --- |"]
    for (kernel, dname), r in sorted(ERRORS.items()):
        lines.append(f"| {kernel} | {dname} | {r['cases']} | {r['ulp']:.2f} | {r['rel']:.2e} |")
    print("\n" + "\n".join(lines))
