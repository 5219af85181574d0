"""Building blocks shared by our model implementations."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels import AttentionBackend, AttentionMetadata, fused_ops

# The elementwise ops live in kernels/fused_ops.py (torch reference + fused Triton dispatch);
# re-exported here under their old names.
from kernels.fused_ops import _swap_halves, silu_and_mul  # noqa: F401
from kernels.fused_ops import apply_rotary_signed as _apply_rotary_signed
from kernels.fused_ops import quick_gelu as _quick_gelu


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """HF's RMSNorm of x; with ``residual``, of ``residual + x``, returned with that sum
        (vLLM's fused residual form: ``normed, residual = norm(x, residual)``)."""
        # x, residual: [..., hidden]
        if residual is None:
            return fused_ops.rms_norm(x, self.weight, self.eps)
        return fused_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, so checkpoints load as they are) that also takes the
    residual add, as ``RMSNorm`` does: ``normed, residual = norm(x, residual)``."""

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """LayerNorm of x; with ``residual``, of ``x + residual``, returned with that sum."""
        # x, residual: [..., hidden]
        if residual is None:
            return super().forward(x)
        if len(self.normalized_shape) != 1:  # the fused op normalises the last dim only
            residual = x + residual
            return super().forward(residual), residual
        return fused_ops.fused_add_layer_norm(x, residual, self.weight, self.bias, self.eps)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names, so checkpoints load as they are) whose 2-D calls go
    through ``fused_ops.linear``: decode-sized fp16/bf16 inputs on CUDA (at most
    ``fused_ops.GEMV_MAX_M`` rows) take the Triton GEMV, everything else ``F.linear`` as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] -> [..., out_features]
        if x.dim() == 2:
            return fused_ops.linear(x, self.weight, self.bias)
        return super().forward(x)


class MergedLinear(Linear):
    """Several HF projections stored as one matmul (q/k/v, or gate/up); loads each shard by index."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(out_sizes), bias=bias)
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]
        self.out_sizes = out_sizes

    def load_shard(self, param: str, shard: int, tensor: torch.Tensor) -> None:
        dst = getattr(self, param)
        start = self.offsets[shard]
        dst.data[start : start + self.out_sizes[shard]].copy_(tensor)


def _rope_inv_freq(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:  # transformers 4.x keeps these as separate attributes
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    base = float(params.get("rope_theta", 10000.0))
    partial = float(getattr(config, "partial_rotary_factor", 1.0))
    dim = int(head_dim * partial)
    if rope_type == "default":
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
        return inv_freq, 1.0
    if rope_type == "dynamic":
        raise ValueError("rope_parameters: dynamic NTK scaling depends on the sequence length and is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_parameters: unsupported rope_type {rope_type!r}")
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(factor)


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) rotary embedding with a precomputed cos/sin table."""

    def __init__(self, config: Any, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv_freq, scaling = _rope_inv_freq(config, head_dim)
        t = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv_freq)  # [max_positions, rot_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        # Kept in fp32 and cast per call, as HF does, so fp32 outputs match bit for bit.
        self.register_buffer("cos", (emb.cos() * scaling), persistent=False)
        self.register_buffer("sin", (emb.sin() * scaling), persistent=False)
        self.rot_dim = emb.shape[-1]

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin [N, 1, rot_dim] in ``dtype``: computed once per forward, shared by all layers."""
        cos = self.cos[positions].to(dtype)[:, None, :]
        sin = self.sin[positions].to(dtype)[:, None, :]
        return cos, _sign_sin(sin)

    def apply(self, x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [N, heads, D] (q and k heads together) rotated by a ``table`` result."""
        return _apply_rotary_signed(x, table[0], table[1], self.rot_dim)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [N]; q: [N, H, D]; k: [N, Hkv, D]
        cos = self.cos[positions].to(q.dtype)[:, None, :]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return _apply_rotary(q, cos, sin, self.rot_dim), _apply_rotary(k, cos, sin, self.rot_dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _sign_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) * sin == swap_halves(x) * sign_sin exactly
    (negation is exact in IEEE arithmetic), which saves the negation kernel in every layer."""
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.cat((-s1, s2), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_dim: int) -> torch.Tensor:
    if rot_dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


class PagedAttention(nn.Module):
    """Writes this step's K/V into the paged cache, then attends through the kernel backend."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.backend = backend

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # q: [N, H, D]; k, v: [N, Hkv, D] -> [N, H * D]
        self.backend.write_kv(k, v, kv_cache, meta.slot_mapping)
        out = self.backend.attend(q, kv_cache, meta, self.scale)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def forward_rotary(
        self,
        qk: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """``forward`` after a full-width neox rotary of q and k (``RotaryEmbedding.apply``), which
        the backend may fuse with the KV write. qk: [N, H + Hkv, D] (q heads first); v: [N, Hkv, D];
        rope: ``RotaryEmbedding.table`` of these positions -> [N, H * D]."""
        q = self.backend.rotary_write_kv(qk, v, rope[0], rope[1], kv_cache, meta.slot_mapping, self.num_heads)
        out = self.backend.attend(q, kv_cache, meta, self.scale)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)


def activation(name: str):
    """The activation a HF config names (hidden_act), as a function."""
    acts = {
        "quick_gelu": _quick_gelu,
        "gelu": F.gelu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
    }
    if name in acts:
        return acts[name]
    from transformers.activations import ACT2FN

    return ACT2FN[name]
