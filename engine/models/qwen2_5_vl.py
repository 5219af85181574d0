"""Qwen2.5-VL: our vision tower with window attention, on top of Qwen2-VL's M-RoPE decoder.

What differs from Qwen2-VL (engine/models/qwen2_vl.py), and what is shared:

* Vision tower (``Qwen2_5_VisionTransformer``): RMSNorm instead of LayerNorm (blocks and the
  merger's ``ln_q``), a SwiGLU MLP with biases (``gate_proj`` / ``up_proj`` / ``down_proj``), and
  window attention. The patch sequence is permuted, one merge unit (m x m patches) at a time, so
  that each window of ``window_size / patch / m`` merged patches square is contiguous (windows
  are cut row by row from the top-left of every frame; the last row / column of windows is
  smaller when the merged grid is not a multiple of the window). Blocks listed in
  ``fullatt_block_indexes`` attend over the whole frame, the others only within a window; the
  merger runs on the permuted sequence and its rows are put back in the processor's order.
  The window index and window lengths are those of HF's ``get_vision_window_index``.
  Patch embedding, the 2D (h, w) rotary table and the merger MLP are Qwen2-VL's.
* Decoder, M-RoPE and weights naming: identical to Qwen2-VL; ``Qwen2_5_VLForConditionalGeneration``
  subclasses ``Qwen2VLForConditionalGeneration`` and only swaps the vision tower.
* M-RoPE positions: images as in Qwen2-VL. A video's temporal positions step by
  ``tokens_per_second * second_per_grid_ts[i]`` (``vision_config.tokens_per_second``); when
  ``second_per_grid_ts`` is not given every video uses 1.0 s per grid, as HF does.

Checkpoint layouts accepted by ``load_weights`` (inherited): what ``save_pretrained`` writes in
transformers 4.x and 5.x (``visual.*``, ``model.layers.*``, ``model.embed_tokens.*``,
``model.norm.*``, ``lm_head.*``) and transformers >= 4.52 / 5's in-memory names
(``model.visual.*``, ``model.language_model.*``, ``lm_head.*``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.layers import RMSNorm, _sign_sin, activation
from engine.models.qwen2_vl import (
    PatchMerger,
    Qwen2VLForConditionalGeneration,
    VisionAttention,
    VisionPatchEmbed,
    VisionTowerBase,
    _grid_list,
    get_mrope_positions,
)
from kernels import fused_ops

__all__ = [
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen2_5_VisionTransformer",
    "get_window_index",
]


# ---------------------------------------------------------------------------------------------
# Window partition
# ---------------------------------------------------------------------------------------------


def get_window_index(
    grid_thw: Sequence[Sequence[int]], spatial_merge_size: int, window_size: int, patch_size: int
) -> tuple[torch.Tensor, list[int]]:
    """(window_index [P / m^2] int64, window lengths in patches) of a batch of images / videos.

    ``window_index[j]`` is the merge unit (in the processor's order, counted over all items) that
    goes to place ``j`` of the permuted sequence. Each frame's merged grid (h/m x w/m) is cut into
    windows of ``window_size // m // patch_size`` merged patches square, taken row-major; units
    inside a window are row-major too. Empty windows are dropped, so the lengths (times m^2) are
    the differences of HF's ``cu_window_seqlens``.
    """
    vms = window_size // spatial_merge_size // patch_size
    if vms < 1:
        raise ValueError(
            f"qwen2_5_vl: window_size {window_size} is smaller than one merged patch "
            f"({spatial_merge_size} x {patch_size} pixels)"
        )
    unit = spatial_merge_size**2
    indices: list[torch.Tensor] = []
    lengths: list[int] = []
    offset = 0
    for t, h, w in grid_thw:
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        index = torch.arange(t * gh * gw).view(t, gh, gw)
        pad_h, pad_w = -gh % vms, -gw % vms
        nh, nw = (gh + pad_h) // vms, (gw + pad_w) // vms
        padded = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
        padded = padded.view(t, nh, vms, nw, vms).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, vms * vms)
        valid = padded >= 0
        counts = valid.sum(-1)
        lengths.extend((counts[counts > 0] * unit).tolist())
        indices.append(padded[valid] + offset)
        offset += t * gh * gw
    index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64)
    return index, lengths


def _segment_groups(lengths: Sequence[int], device: torch.device) -> list[torch.Tensor]:
    """Consecutive segments of the given lengths, grouped by length: one [num_segments, length]
    row-index tensor per distinct length (so each group is one batched attention call)."""
    by_len: dict[int, list[int]] = {}
    start = 0
    for n in lengths:
        by_len.setdefault(int(n), []).append(start)
        start += int(n)
    groups = []
    for n, starts in by_len.items():
        if n == 0:
            continue
        s = torch.tensor(starts, dtype=torch.int64)
        groups.append((s[:, None] + torch.arange(n)).to(device))
    return groups


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------


class Qwen2_5_VisionAttention(VisionAttention):
    """Qwen2-VL's vision attention (same ``qkv`` / ``proj``) over window or full-frame groups."""

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        # x: [P, dim]; cos, sin: [P, head_dim] fp32, sin signed (``_sign_sin``);
        # groups: [num_segments, length] row indices each
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, self.head_dim)
        q, k = fused_ops.vision_rotary(qkv, cos, sin)  # [P, H, D] each, rotated in fp32 like HF
        v = qkv[:, 2]
        if len(groups) == 1 and groups[0].shape[0] == 1:  # one segment: the whole sequence
            o = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)))
            return self.proj(o[0].transpose(0, 1).reshape(n, -1))
        out = torch.empty_like(q)
        for idx in groups:
            # [segments, length, H, D] -> [segments, H, length, D]: one batched SDPA per length
            qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=False)
            out[idx] = o.transpose(1, 2)
        return self.proj(out.view(n, -1))


class Qwen2_5_VisionMLP(nn.Module):
    """SwiGLU with biases: down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=True)
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [P, dim]; gate, up: [P, hidden]
        if self.act is F.silu:  # Qwen2.5-VL's choice: act and product in one kernel
            return self.down_proj(fused_ops.silu_mul(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Qwen2_5_VisionBlock(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        dim = config.hidden_size
        self.norm1 = RMSNorm(dim, eps=1e-6)
        self.norm2 = RMSNorm(dim, eps=1e-6)
        self.attn = Qwen2_5_VisionAttention(dim, config.num_heads)
        self.mlp = Qwen2_5_VisionMLP(dim, config.intermediate_size, config.hidden_act)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        groups: Sequence[torch.Tensor],
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual-carrying form, as Qwen2-VL's ``VisionBlock``: x: [P, dim] (the block's input
        when ``residual`` is None, else the previous block's MLP output) -> (mlp output, residual
        stream); each add is fused into the next RMSNorm. Same values as
        ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))`` on the torch path."""
        if residual is None:
            residual = x
            h = self.norm1(x)
        else:
            h, residual = self.norm1(x, residual)
        h = self.attn(h, cos, sin, groups)
        h, residual = self.norm2(h, residual)
        return self.mlp(h), residual


class Qwen2_5_PatchMerger(PatchMerger):
    """Qwen2-VL's merger with an RMSNorm ``ln_q``."""

    def __init__(self, dim: int, context_dim: int, merge: int) -> None:
        super().__init__(dim, context_dim, merge)
        self.ln_q = RMSNorm(context_dim, eps=1e-6)


class Qwen2_5_VisionTransformer(VisionTowerBase):
    """Qwen2.5-VL's ViT. Parameter names follow the checkpoint's ``visual.*`` sub-names.

    ``forward(pixel_values [P, C*T*p*p], grid_thw [n, 3]) -> [P / m^2, out_hidden_size]``, rows in
    the processor's (placeholder) order. Attention never crosses an image or a video frame.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.spatial_merge_size = int(config.spatial_merge_size)
        self.patch_size = int(config.patch_size)
        self.window_size = int(config.window_size)
        self.fullatt_block_indexes = {int(i) for i in (getattr(config, "fullatt_block_indexes", None) or [])}
        in_channels = getattr(config, "in_channels", None) or getattr(config, "in_chans", 3)
        dim = config.hidden_size
        self.patch_embed = VisionPatchEmbed(self.patch_size, config.temporal_patch_size, in_channels, dim)
        self._init_rotary(config, dim // config.num_heads)
        self.blocks = nn.ModuleList(Qwen2_5_VisionBlock(config) for _ in range(config.depth))
        self.merger = Qwen2_5_PatchMerger(config.out_hidden_size, dim, self.spatial_merge_size)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        grid = _grid_list(grid_thw)
        total = sum(t * h * w for t, h, w in grid)
        if pixel_values.shape[0] != total:
            raise ValueError(f"qwen2_5_vl: {pixel_values.shape[0]} patches do not match grid_thw {grid} ({total})")
        x = self.patch_embed(pixel_values)
        device = x.device
        unit = self.spatial_merge_size**2
        window_index, window_lens = get_window_index(grid, self.spatial_merge_size, self.window_size, self.patch_size)
        window_index = window_index.to(device)
        # Patch-level permutation: whole merge units move, so the merger still sees m^2 rows in a row.
        perm = (window_index[:, None] * unit + torch.arange(unit, device=device)).reshape(-1)
        x = x[perm]
        cos, sin = self.rotary(grid, device)
        cos, sin = cos[perm], _sign_sin(sin[perm])  # [P, head_dim] fp32; sin signed once for all blocks
        # Frames stay contiguous under the permutation (windows never cross a frame).
        full_groups = _segment_groups([h * w for t, h, w in grid for _ in range(t)], device)
        window_groups = _segment_groups(window_lens, device)
        residual = None  # carried apart from the blocks' outputs: see Qwen2_5_VisionBlock.forward
        for i, blk in enumerate(self.blocks):
            groups = full_groups if i in self.fullatt_block_indexes else window_groups
            x, residual = blk(x, cos, sin, groups, residual)
        merged = self.merger(x, residual)  # [P / m^2, out], permuted order; ln_q adds the last output
        out = torch.empty_like(merged)
        out[window_index] = merged
        return out


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL: Qwen2-VL's engine-facing model with the Qwen2.5-VL vision tower.

    Same interface as ``Qwen2VLForConditionalGeneration`` (``get_input_embeddings``, ``forward``,
    ``compute_logits``, ``embed_multimodal``, ``get_mrope_positions``, ``num_mm_tokens``,
    ``load_weights``).
    """

    vision_tower_cls = Qwen2_5_VisionTransformer
    vision_graphs_ok = False  # its window index is built on the host and copied per pass

    def get_mrope_positions(self, input_ids, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None):
        videos = _grid_list(video_grid_thw)
        if videos and second_per_grid_ts is None:
            second_per_grid_ts = [1.0] * len(videos)  # HF's default: temporal step = tokens_per_second
        return get_mrope_positions(input_ids, image_grid_thw, video_grid_thw, self.config, second_per_grid_ts)
