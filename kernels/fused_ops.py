"""The model layers' elementwise ops and skinny linears behind one switch: fused Triton kernels on
CUDA, torch elsewhere.

Each public function here is the torch reference implementation of an op the models use (moved
from engine/models/layers.py, which re-exports them) plus one dispatch test: the fused kernel of
``kernels/triton_fused.py`` (for ``linear`` / ``silu_and_mul_linear``: the GEMV of
``kernels/triton_gemv.py``) runs instead only when

  * the tensor is on CUDA (or CPU with ``force_cpu_triton(True)``: a test hook, meant for
    Triton's interpreter, ``TRITON_INTERPRET=1`` set before the first fused call),
  * its dtype is fp16 or bf16: fp32 keeps the torch code, which fp32 runs compare bit for bit
    with HF transformers,
  * the fused kernels are enabled: ``VLMSERVE_FUSED_KERNELS`` (default on; "0" turns them off),
    overridden by ``set_enabled(True / False)``; ``set_enabled(None)`` rereads the variable,
  * triton imports (tried once, on the first call that would use it),
  * and the op's shape is one the kernel handles (full rotary, rows of at most
    ``MAX_NORM_WIDTH`` (``MAX_LAYER_NORM_WIDTH`` for LayerNorm), matching dtypes); anything else
    takes the torch path.

The linears take the GEMV only for decode-sized inputs: 2-D x of at most ``GEMV_MAX_M`` (8) rows
with unit column stride, a contiguous weight (and bias) of x's dtype, and a shape where the GEMV's
tuning table found it faster than cuBLAS (``triton_gemv.use_gemv``); anything else (prefill,
vision towers, fp32) runs ``F.linear`` as before. The GEMV accumulates in fp32 and rounds once,
so it differs from cuBLAS only in summation order (see tests/test_gemv.py); ``silu_and_mul_linear``
feeds it the activation rounded exactly as ``silu_and_mul``'s kernel rounds it.

The kernels reproduce these references' roundings: bit for bit for the rotaries and the residual
adds, within one ulp of the dtype otherwise (two where an intermediate torch stores in the dtype,
e.g. silu(gate) before ``* up``, sits on a rounding tie); see tests/test_fused_kernels.py. The
choice is made in Python at call time, so a CUDA graph keeps the path active at its capture.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _env_enabled() -> bool:
    return os.environ.get("VLMSERVE_FUSED_KERNELS", "1").strip() != "0"


_enabled: bool = _env_enabled()
_force_cpu: bool = False
_triton_mod: ModuleType | None | bool = None  # None: not tried yet; False: import failed
_gemv_mod: ModuleType | None | bool = None  # kernels.triton_gemv, likewise

GEMV_MAX_M = 8  # rows up to which ``linear`` / ``silu_and_mul_linear`` take the Triton GEMV


def set_enabled(flag: bool | None) -> None:
    """Turn the fused kernels on or off for later calls; ``None`` rereads VLMSERVE_FUSED_KERNELS."""
    global _enabled
    _enabled = _env_enabled() if flag is None else bool(flag)


def is_enabled() -> bool:
    """Whether fused kernels may run (they still need CUDA, fp16/bf16 and triton)."""
    return _enabled


def force_cpu_triton(flag: bool) -> None:
    """Test hook: route CPU tensors to the Triton kernels too (needs ``TRITON_INTERPRET=1`` set
    before ``kernels.triton_fused`` is first imported)."""
    global _force_cpu
    _force_cpu = bool(flag)


def _load_triton() -> ModuleType | None:
    global _triton_mod
    if _triton_mod is None:
        try:
            import kernels.triton_fused as mod

            _triton_mod = mod
        except Exception as exc:  # noqa: BLE001 - no triton, or one without a usable backend: torch ops
            logger.warning("fused kernels unavailable, using torch ops: %s", exc)
            _triton_mod = False
    return _triton_mod or None


def _load_gemv() -> ModuleType | None:
    global _gemv_mod
    if _gemv_mod is None:
        try:
            import kernels.triton_gemv as mod

            _gemv_mod = mod
        except Exception as exc:  # noqa: BLE001 - as _load_triton: torch's linear
            logger.warning("Triton GEMV unavailable, using torch linear: %s", exc)
            _gemv_mod = False
    return _gemv_mod or None


def _fast(x: torch.Tensor) -> ModuleType | None:
    """The Triton module when ``x`` should take the fused path, else None. Cheapest tests first:
    this runs for every op of every layer."""
    if not _enabled or x.dtype not in _HALF_DTYPES:
        return None
    if not (x.is_cuda or (_force_cpu and x.device.type == "cpu")):
        return None
    return _load_triton()


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int) -> ModuleType | None:
    """The GEMV module when ``x @ weight.T (+ bias)`` (weight [N, k]) should take it, else None."""
    if (
        _fast(x) is None
        or x.dim() != 2
        or not 1 <= x.shape[0] <= GEMV_MAX_M
        or x.stride(-1) != 1
        or weight.dim() != 2
        or weight.shape[1] != k
        or k == 0
        or weight.dtype != x.dtype
        or weight.device != x.device
        or not weight.is_contiguous()
    ):
        return None
    if bias is not None and (bias.dtype != x.dtype or bias.shape != weight.shape[:1] or bias.stride(0) != 1):
        return None
    g = _load_gemv()
    # the GEMV's tuning table: shapes and row counts where cuBLAS measured faster stay on cuBLAS
    return g if g is not None and g.use_gemv(x.shape[0], weight.shape[0], k) else None


# -- references ------------------------------------------------------------------------------------


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same order of operations as HF's LlamaRMSNorm (normalise in fp32, scale in input dtype).
    # F.rms_norm without a weight upcasts to fp32, multiplies by rsqrt(mean(x^2) + eps) and
    # casts back: HF's op sequence in one call (bit-identical on CPU). fp32 on CUDA keeps the
    # op-by-op form so that fp32 GPU runs stay bit-equal to HF's reduction order.
    if x.dtype == torch.float32 and x.is_cuda:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


# -- public ops ------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm: ``weight * to_dtype(fp32(x) * rsqrt(mean(fp32(x)^2) + eps))``; x: [..., C], weight: [C]."""
    tf = _fast(x)
    if tf is not None and weight.dtype == x.dtype and weight.shape == x.shape[-1:] and x.shape[-1] <= tf.MAX_NORM_WIDTH:
        return tf.rms_norm(x, weight, eps)
    return _rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x): a residual add and the next norm in one pass.

    x, residual: [..., C] of one dtype. Neither input is written (the first layer's residual is the
    caller's embeddings).
    """
    tf = _fast(x)
    if (
        tf is not None
        and residual.dtype == x.dtype
        and weight.dtype == x.dtype
        and residual.shape == x.shape
        and weight.shape == x.shape[-1:]
        and x.shape[-1] <= tf.MAX_NORM_WIDTH
    ):
        return tf.fused_add_rms_norm(x, residual, weight, eps)
    residual = residual + x
    return _rms_norm_ref(residual, weight, eps), residual


def fused_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x + residual), x + residual): a residual add and the next LayerNorm in one pass.

    x, residual: [..., C] of one dtype; weight, bias: [C] or None (no weight takes the torch path,
    no bias is fine for the kernel). The sum is rounded to the dtype (torch's ``x + residual``) and
    normalised from that rounded value, as ``F.layer_norm`` of the stored sum is. With
    ``residual=None`` (a first block): ``(layer_norm(x), x)`` by torch's kernel. Neither input is
    written.
    """
    if residual is None:
        # Torch's own LayerNorm kernel (vectorized_layer_norm_kernel on CUDA): one call per tower,
        # and kernels.triton_fused.layer_norm is not known to beat it.
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps), x
    tf = _fast(x)
    if (
        tf is not None
        and residual.dtype == x.dtype
        and weight is not None
        and weight.dtype == x.dtype
        and (bias is None or (bias.dtype == x.dtype and bias.shape == x.shape[-1:]))
        and residual.shape == x.shape
        and weight.shape == x.shape[-1:]
        and x.shape[-1] <= tf.MAX_LAYER_NORM_WIDTH
    ):
        return tf.fused_add_layer_norm(x, residual, weight, bias, eps)
    residual = x + residual
    return F.layer_norm(residual, residual.shape[-1:], weight, bias, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [N, 2I] (gate | up, a merged gate/up projection) -> silu(gate) * up: [N, I]."""
    tf = _fast(x)
    if tf is not None and x.dim() == 2:
        return tf.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; decode-sized 2-D x (<= GEMV_MAX_M rows) takes the Triton GEMV."""
    g = _gemv(x, weight, bias, x.shape[-1])
    if g is not None:
        return g.gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(silu_and_mul(x), weight, bias)``: x [M, 2I] (gate | up), weight [N, I].

    Decode-sized x takes one GEMV kernel with the activation fused into its input (up to the
    GEMV module's ``FUSED_SILU_MAX_M`` rows; above, the activation kernel and then the GEMV: the
    same bits either way)."""
    g = _gemv(x, weight, bias, x.shape[-1] // 2) if x.shape[-1] % 2 == 0 else None
    if g is not None:
        if x.shape[0] <= g.FUSED_SILU_MAX_M:
            return g.gemv_silu_mul(x, weight, bias)
        return g.gemv(silu_and_mul(x), weight, bias)
    return F.linear(silu_and_mul(x), weight, bias)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for separate projections; gate, up: [N, I] of one dtype -> [N, I]."""
    tf = _fast(gate)
    if tf is not None and gate.dim() == 2 and gate.shape == up.shape and up.dtype == gate.dtype:
        return tf.act_and_mul(gate, up, "silu")
    return F.silu(gate) * up


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 * x)`` (CLIP's and Qwen2-VL's vision MLP activation)."""
    tf = _fast(x)
    if tf is not None:
        return tf.quick_gelu(x)
    return x * torch.sigmoid(1.702 * x)


def apply_rotary_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, rot_dim: int) -> torch.Tensor:
    """Neox rotary ``x * cos + swap_halves(x) * sin_signed`` over the first ``rot_dim`` of D.

    x: [N, heads, D] (q and k heads together; a strided view is fine); cos, sin_signed:
    [N, 1, rot_dim] in x's dtype, ``sin_signed`` with its first half negated (layers._sign_sin).
    Returns a new [N, heads, D] tensor; x is not written.
    """
    tf = _fast(x)
    if (
        tf is not None
        and rot_dim == x.shape[-1]
        and x.dim() == 3
        and cos.dtype == x.dtype
        and sin_signed.dtype == x.dtype
        and cos.shape == sin_signed.shape == (x.shape[0], 1, rot_dim)  # one row per token, no broadcast
        and cos.stride(-1) == 1
        and sin_signed.stride(-1) == 1
    ):
        return tf.rotary(x, cos, sin_signed)
    if rot_dim == x.shape[-1]:
        return x * cos + _swap_halves(x) * sin_signed
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    return torch.cat((rot * cos + _swap_halves(rot) * sin_signed, rest), dim=-1)


def vision_rotary(
    qkv: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of a vision qkv rotated in fp32, as HF's Qwen2-VL / Qwen2.5-VL towers do.

    qkv: [P, 3, H, D]; cos, sin_signed: [P, D] fp32 (sin with its first half negated). Returns
    q, k: [P, H, D] in qkv's dtype (v is ``qkv[:, 2]``, untouched).
    """
    tf = _fast(qkv)
    if (
        tf is not None
        and cos.dtype == torch.float32
        and sin_signed.dtype == torch.float32
        and cos.shape == sin_signed.shape == (qkv.shape[0], qkv.shape[-1])
        and cos.stride(-1) == 1
        and sin_signed.stride(-1) == 1
    ):
        return tf.vision_rotary(qkv, cos, sin_signed)
    # HF rotates q and k in fp32 and casts back; q and k are rotated together here.
    qk = qkv[:, :2].float()
    cos, sin_signed = cos[:, None, None, :], sin_signed[:, None, None, :]
    qk = (qk * cos + _swap_halves(qk) * sin_signed).to(qkv.dtype)  # [P, 2, H, D]
    return qk[:, 0], qk[:, 1]


_VIT_CHOICES = ("sdpa", "triton")
_vit_choice: str | None = None  # VLMSERVE_VIT_ATTENTION, read on the first vision pass


def set_vit_attention(choice: str | None) -> None:
    """Override ``VLMSERVE_VIT_ATTENTION`` in this process ('sdpa' or 'triton'; None: read the
    variable again), for in-process comparisons. Vision passes already captured in CUDA graphs
    keep the kernel they were captured with: drop those graphs too."""
    global _vit_choice
    if choice is not None and choice not in _VIT_CHOICES:
        raise ValueError(f"vit attention: expected 'sdpa' or 'triton', got {choice!r}")
    _vit_choice = choice


def vit_attention_choice() -> str:
    """The ViT attention kernel in use: 'sdpa' or 'triton' (``VLMSERVE_VIT_ATTENTION``, read once)."""
    global _vit_choice
    if _vit_choice is None:
        choice = os.environ.get("VLMSERVE_VIT_ATTENTION", "sdpa").strip().lower()
        if choice not in _VIT_CHOICES:
            raise ValueError(f"VLMSERVE_VIT_ATTENTION: expected 'sdpa' or 'triton', got {choice!r}")
        _vit_choice = choice
    return _vit_choice


def _vit_triton_module() -> ModuleType | None:
    """kernels.triton_vit_attention when the choice is 'triton', else None."""
    if vit_attention_choice() == "sdpa":
        return None
    import kernels.triton_vit_attention as mod  # cached by Python after the first import

    return mod


def vit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: list[tuple[int, int, int, int]]
) -> torch.Tensor:
    """Bidirectional attention within equal-length frames (a vision tower's pass).

    q, k, v: [P, H, D]; runs: (first row, end row, frames, rows per frame) of consecutive
    equal-length frames -> [P, H, D]. Torch's SDPA, one batched call per run (cuDNN's kernel on
    CUDA), unless ``VLMSERVE_VIT_ATTENTION=triton`` picks ``kernels.triton_vit_attention`` (no
    head-dim padding) for fp16 / bf16 CUDA tensors whose head dim it splits; that kernel measured
    level with cuDNN's on the H200 at best (0.296 against 0.289 ms on W1's shape), hence opt-in.
    """
    n, num_heads, head_dim = q.shape
    mod = _vit_triton_module() if _fast(q) is not None and q.is_cuda else None
    if mod is not None:
        try:
            mod.split_head_dim(head_dim)
        except ValueError:  # a head dim the kernel cannot split: SDPA below
            pass
        else:
            return mod.vit_attention(q, k, v, runs)
    if len(runs) == 1:
        _, _, frames, length = runs[0]
        o = F.scaled_dot_product_attention(
            *(t.view(frames, length, num_heads, head_dim).transpose(1, 2) for t in (q, k, v))
        )  # [frames, H, length, D]
        return o.transpose(1, 2).reshape(n, num_heads, head_dim)
    out = torch.empty((n, num_heads, head_dim), dtype=q.dtype, device=q.device)
    for start, end, frames, length in runs:
        # Frames of equal length (of one or several items): one batched SDPA, frame = batch row.
        qs, ks, vs = (t[start:end].view(frames, length, num_heads, head_dim).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=False)
        out[start:end] = o.transpose(1, 2).reshape(end - start, num_heads, head_dim)
    return out


__all__ = [
    "apply_rotary_signed",
    "force_cpu_triton",
    "fused_add_layer_norm",
    "fused_add_rms_norm",
    "is_enabled",
    "linear",
    "quick_gelu",
    "rms_norm",
    "set_enabled",
    "set_vit_attention",
    "silu_and_mul",
    "silu_and_mul_linear",
    "silu_mul",
    "vision_rotary",
    "vit_attention",
    "vit_attention_choice",
]
