"""MiniCPM-V 2.5 / 2.6's perceiver resampler: a slice's vision features -> ``query_num`` LM rows.

One cross-attention, ``query_num`` learned queries attending over the slice's patch features:

* keys / values: ``kv = ln_kv(kv_proj(features))`` (``kv_proj`` maps the tower width onto the
  LM's hidden size D, no bias); keys are ``kv + pos`` with ``pos`` the 2D sin-cos embedding of each
  patch's (row, column), values are ``kv`` alone;
* queries: ``ln_q(query)``, no position;
* attention: ``nn.MultiheadAttention``'s math (packed ``in_proj_weight`` / ``in_proj_bias`` for
  q, k, v; D / 128 heads; ``out_proj``), padded patches masked out;
* output: ``ln_post(attn) @ proj``: ``[query_num, D]`` per slice.

2D sin-cos (``sincos_2d``): for row r and column c, with ``omega_k = 10000^(-k / (D/4))``
(k < D/4): ``[sin(c*omega), cos(c*omega), sin(r*omega), cos(r*omega)]`` — the column's half
first (the published code builds its grid with ``meshgrid(w, h)``). The table is built for 70x70
patches (the published default) and grown when a slice is larger.

Parameter names follow the checkpoint below ``resampler.``: ``query``, ``kv_proj.weight``,
``attn.{in_proj_weight, in_proj_bias, out_proj.*}``, ``ln_q.*``, ``ln_kv.*``, ``ln_post.*``, ``proj``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Resampler", "sincos_2d"]


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """The 2D sin-cos table [rows, cols, dim] (see the module docstring), float32."""
    if dim % 4:
        raise ValueError(f"minicpmv: the resampler width {dim} is not a multiple of 4")
    quarter = dim // 4
    # float32 throughout, as the published table is computed (numpy float32): the checkpoint was
    # trained with those values.
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # [D/4]

    def half(pos: torch.Tensor) -> torch.Tensor:  # [n] -> [n, D/2]
        angle = pos.float()[:, None] * omega[None, :]
        return torch.cat([angle.sin(), angle.cos()], dim=-1)

    by_col = half(torch.arange(cols))[None, :, :].expand(rows, cols, -1)
    by_row = half(torch.arange(rows))[:, None, :].expand(rows, cols, -1)
    return torch.cat([by_col, by_row], dim=-1)


class _PackedAttention(nn.Module):
    """Holds ``nn.MultiheadAttention``'s parameters under its names (``in_proj_weight`` [3D, D],
    ``in_proj_bias`` [3D], ``out_proj``) for the resampler's own forward."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)


class Resampler(nn.Module):
    def __init__(self, num_queries: int, dim: int, num_heads: int, kv_dim: int, max_size: int = 70) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"minicpmv: resampler width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.empty(num_queries, dim))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = _PackedAttention(dim)
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Parameter(torch.empty(dim, dim))
        self.register_buffer("pos_table", sincos_2d(dim, max_size, max_size), persistent=False)

    def _pos(self, h: int, w: int) -> torch.Tensor:
        """[h*w, D] key positions of an h x w patch grid (row-major)."""
        if h > self.pos_table.shape[0] or w > self.pos_table.shape[1]:
            side = max(h, w, self.pos_table.shape[0])
            self.pos_table = sincos_2d(self.pos_table.shape[-1], side, side).to(self.pos_table.device)
        return self.pos_table[:h, :w].reshape(h * w, -1)

    def forward(self, features: torch.Tensor, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        """features [B, L, kv_dim] (rows past each slice's h*w are padding), grids (h, w) per
        slice -> [B, num_queries, D]."""
        b, length, _ = features.shape
        dim = self.query.shape[1]
        kv = self.ln_kv(self.kv_proj(features))  # [B, L, D]
        pos = torch.zeros_like(kv)
        for i, (h, w) in enumerate(grids):
            pos[i, : h * w] = self._pos(h, w).to(kv.dtype)
        wq, wk, wv = self.attn.in_proj_weight.chunk(3)
        bq, bk, bv = self.attn.in_proj_bias.chunk(3)
        heads, hd = self.num_heads, dim // self.num_heads
        q = F.linear(self.ln_q(self.query), wq, bq).view(1, -1, heads, hd).transpose(1, 2)  # [1, H, Q, hd]
        k = F.linear(kv + pos, wk, bk).view(b, length, heads, hd).transpose(1, 2)  # [B, H, L, hd]
        v = F.linear(kv, wv, bv).view(b, length, heads, hd).transpose(1, 2)
        lengths = torch.tensor([h * w for h, w in grids])
        valid = (torch.arange(length)[None, :] < lengths[:, None]).to(kv.device)  # [B, L]
        o = F.scaled_dot_product_attention(q.expand(b, -1, -1, -1), k, v, attn_mask=valid[:, None, None, :])
        o = self.attn.out_proj(o.transpose(1, 2).reshape(b, -1, dim))  # [B, Q, D]
        return self.ln_post(o) @ self.proj
