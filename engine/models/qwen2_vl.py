"""Qwen2-VL: our implementation of the vision tower, M-RoPE and the Qwen2 decoder over a paged KV cache.

Pieces:

* ``Qwen2VisionTransformer`` — patch embedding, 2D (h, w) rotary embedding, pre-LN ViT blocks whose
  attention never crosses an image or a video frame, and the 2x2 ``PatchMerger`` that projects
  to the LM hidden size. ``forward(pixel_values [P, C*T*p*p], grid_thw [n, 3]) -> [P / m^2, H]``.
* ``get_mrope_positions`` — the 3D (temporal, height, width) rope index of a prompt, and the delta
  that places every later (decode) token: position ``p >= L`` is ``p + delta`` in all three sections.
* ``MRotaryEmbedding`` — rotary embedding whose frequency bands take their angle from the t, h or w
  position row (``mrope_section``), as HF's Qwen2-VL text rotary embedding does.
* ``Qwen2VLForConditionalGeneration`` — the engine-facing model (``uses_mrope = True``).

Checkpoint layouts accepted by ``load_weights``: what ``save_pretrained`` writes (transformers 4.x
and 5.x alike: ``visual.*``, ``model.layers.*``, ``model.embed_tokens.*``, ``model.norm.*``,
``lm_head.*``) and transformers 5's in-memory names (``model.visual.*``,
``model.language_model.*``, ``lm_head.*``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.device import to_device_async
from engine.models.layers import (
    LayerNorm,
    _apply_rotary,
    _apply_rotary_signed,
    _rope_inv_freq,
    _sign_sin,
    activation,
)
from engine.models.llama import _STACKED, CausalLMTextMixin, LlamaModel
from kernels import AttentionBackend, fused_ops

__all__ = [
    "MRotaryEmbedding",
    "Qwen2VLForConditionalGeneration",
    "Qwen2VisionTransformer",
    "get_mrope_decode_positions",
    "get_mrope_positions",
    "num_mm_tokens",
]


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _frame_position_ids(h: int, w: int, merge: int) -> np.ndarray:
    """(h, w) coordinates of one frame's patches in the processor's order: [h*w, 2] int64."""
    hpos = np.broadcast_to(np.arange(h).reshape(h // merge, merge, 1, 1), (h // merge, merge, w // merge, merge))
    wpos = np.broadcast_to(np.arange(w).reshape(1, 1, w // merge, merge), (h // merge, merge, w // merge, merge))
    # [h/m, m, w/m, m] -> [h/m, w/m, m, m] -> flat
    out = np.stack([hpos.transpose(0, 2, 1, 3).reshape(-1), wpos.transpose(0, 2, 1, 3).reshape(-1)], axis=-1)
    out.setflags(write=False)  # shared by every frame of this size
    return out


def _vision_position_ids(grid_thw: list[list[int]], merge: int, device: torch.device) -> torch.Tensor:
    """(h, w) patch coordinates of every patch, in the processor's patch order: [P, 2] int64.

    The image processor emits patches merge-block by merge-block (row of blocks, column of blocks,
    then the m x m patches inside a block), so the coordinates are laid out the same way; a
    video repeats one frame's layout ``t`` times. Built on the host (one frame layout per size,
    cached) and copied once: per-image device ops would cost a dozen launches an image.
    """
    parts = [np.tile(_frame_position_ids(h, w, merge), (t, 1)) if t > 1 else _frame_position_ids(h, w, merge)
             for t, h, w in grid_thw]
    pos = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)
    return to_device_async(torch.from_numpy(pos.astype(np.int64, copy=len(parts) == 1)), device)


class VisionPatchEmbed(nn.Module):
    """Conv3d with kernel == stride == (T, p, p) over one flattened patch.

    The weight keeps the checkpoint's Conv3d shape [embed, C, T, p, p] so it loads as is. In fp32
    it runs as HF's Conv3d does, so the tower's output is HF's bit for bit: the same product as a
    matmul differs in summation order (7e-7 relative), and large-weight networks amplify that
    into different greedy tokens (tests/test_vision_exactness.py). fp16 / bf16 (serving) keep the
    matmul: about 5x faster than the CPU conv at Qwen2-VL-2B's width (1024 patches: 87 against
    417 ms on 2 cores), and there HF's own conv kernels round differently from device to device.
    (On CUDA an fp32 conv is cuDNN's, TF32 unless ``torch.backends.cudnn.allow_tf32`` is off: as HF's.)
    """

    def __init__(self, patch_size: int, temporal_patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=kernel, stride=kernel, bias=False)
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [P, C*T*p*p] -> [P, embed]
        w = self.proj.weight
        x = x.to(w.dtype)
        if w.dtype == torch.float32:
            return F.conv3d(x.view(-1, *w.shape[1:]), w, stride=w.shape[2:]).view(-1, self.embed_dim)
        return F.linear(x, w.view(self.embed_dim, -1))


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, runs: Sequence[tuple[int, int, int, int]]
    ) -> torch.Tensor:
        # x: [P, dim]; cos, sin: [P, head_dim] fp32, sin signed (``_sign_sin``);
        # runs: (first row, end row, frames, patches per frame) of consecutive equal-size frames
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, self.head_dim)
        # HF rotates q and k in fp32 and casts back (one fused kernel on CUDA in fp16 / bf16)
        q, k = fused_ops.vision_rotary(qkv, cos, sin)  # [P, H, D] each
        o = fused_ops.vit_attention(q, k, qkv[:, 2], list(runs))  # [P, H, D]
        return self.proj(o.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, config.num_heads)
        self.mlp = VisionMLP(dim, int(dim * config.mlp_ratio), config.hidden_act)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        runs: Sequence[tuple[int, int, int, int]],
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pre-LN block in vLLM's residual-carrying form: returns (mlp output, residual stream)
        whose sum is the block's output; the next block's norm1 (or the merger's ln_q) adds them
        in the same pass as its LayerNorm (one fused kernel on CUDA in fp16 / bf16).

        x: [P, dim], the block's input when ``residual`` is None (first block), else the previous
        block's MLP output with ``residual`` the stream before it. Same values, op for op, as
        ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))`` on the torch path.
        """
        if residual is None:
            residual = x
            h = self.norm1(x)
        else:
            h, residual = self.norm1(x, residual)
        h = self.attn(h, cos, sin, runs)
        h, residual = self.norm2(h, residual)
        return self.mlp(h), residual


def _frame_runs(grid: Sequence[Sequence[int]]) -> list[tuple[int, int, int, int]]:
    """(first row, end row, frames, patches per frame) of consecutive frames of equal size, over
    all items: attention never crosses a frame, and equal-size frames share one SDPA call."""
    runs: list[list[int]] = []
    start = 0
    for t, h, w in grid:
        length = h * w
        if t * length == 0:
            continue
        if runs and runs[-1][3] == length:
            runs[-1][1] += t * length
            runs[-1][2] += t
        else:
            runs.append([start, start + t * length, t, length])
        start += t * length
    return [tuple(r) for r in runs]


class PatchMerger(nn.Module):
    """LayerNorm, then each m x m block of consecutive patches concatenated and projected (MLP)."""

    def __init__(self, dim: int, context_dim: int, merge: int) -> None:
        super().__init__()
        self.hidden = context_dim * merge * merge
        self.ln_q = LayerNorm(context_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: [P, context_dim] (with ``residual``: the last block's MLP output, ``x + residual``
        being the tower's output, added in ``ln_q``'s pass) -> [P / m^2, dim]."""
        h = self.ln_q(x) if residual is None else self.ln_q(x, residual)[0]
        return self.mlp(h.view(-1, self.hidden))


class VisionTowerBase(nn.Module):
    """What Qwen2-VL's and Qwen2.5-VL's ViTs share: the 2D (h, w) rotary table and ``dtype``."""

    def _init_rotary(self, config: Any, head_dim: int) -> None:
        rope = getattr(config, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", 10000.0))
        spatial_dim = head_dim // 2  # half the head for h, half for w
        inv_freq = 1.0 / (theta ** (torch.arange(0, spatial_dim, 2, dtype=torch.float32) / spatial_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def rotary(self, grid_thw: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = _vision_position_ids(grid_thw, self.spatial_merge_size, device)  # [P, 2]
        freqs = pos[..., None].float() * self.inv_freq.to(device)  # [P, 2, head_dim/4]
        freqs = freqs.flatten(1)  # [P, head_dim/2]: h bands then w bands
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class Qwen2VisionTransformer(VisionTowerBase):
    """Qwen2-VL's ViT. Parameter names follow the checkpoint's ``visual.*`` sub-names."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_embed = VisionPatchEmbed(
            config.patch_size, config.temporal_patch_size, getattr(config, "in_channels", 3), config.embed_dim
        )
        self._init_rotary(config, config.embed_dim // config.num_heads)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config.hidden_size, config.embed_dim, config.spatial_merge_size)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """pixel_values: [P, C*T*p*p]; grid_thw: [n, 3] (t, h, w in patches) -> [P / m^2, lm_hidden]."""
        grid = [list(map(int, g)) for g in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw)]
        total = sum(t * h * w for t, h, w in grid)
        if pixel_values.shape[0] != total:
            raise ValueError(f"qwen2_vl: {pixel_values.shape[0]} patches do not match grid_thw {grid} ({total})")
        x = self.patch_embed(pixel_values)
        cos, sin = self.rotary(grid, x.device)
        sin = _sign_sin(sin)  # cos, sin: [P, head_dim] fp32; signed once for all blocks
        runs = _frame_runs(grid)
        residual = None  # blocks carry the residual stream apart: see VisionBlock.forward
        for blk in self.blocks:
            x, residual = blk(x, cos, sin, runs, residual)
        return self.merger(x, residual)  # ln_q adds the last block's output to the stream


def num_mm_tokens(grid_thw: torch.Tensor | Sequence[Sequence[int]], spatial_merge_size: int) -> list[int]:
    """LM placeholder tokens of each image / video: t * h * w / merge^2."""
    grid = grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw
    return [int(t) * int(h) * int(w) // (spatial_merge_size**2) for t, h, w in grid]


# ---------------------------------------------------------------------------------------------
# M-RoPE positions
# ---------------------------------------------------------------------------------------------


def _grid_list(grid) -> list[list[int]]:
    if grid is None:
        return []
    if torch.is_tensor(grid):
        grid = grid.tolist()
    return [list(map(int, g)) for g in grid]


def get_mrope_positions(
    input_ids: Sequence[int],
    image_grid_thw,
    video_grid_thw,
    config: Any,
    second_per_grid_ts: Sequence[float] | torch.Tensor | None = None,
    *,
    hf5_spatial_advance: bool = False,
) -> tuple[torch.Tensor, int]:
    """Qwen2-VL's 3D rope index of one prompt -> (positions [3, L] int64, mrope_delta).

    Text tokens advance the three rows together. Each run of ``t*h*w/m^2`` image (video) pad
    tokens takes the next grid of ``image_grid_thw`` (``video_grid_thw``) and gets positions
    ``start + (t_idx * interval, h_idx, w_idx)`` over the merged grid, where ``start`` is the
    position the next text token would have had. ``interval`` is 1 (Qwen2-VL), or
    ``tokens_per_second * second_per_grid_ts[i]`` for videos when the vision config has
    ``tokens_per_second`` (Qwen2.5-VL). Text after an item starts at the item's max position + 1
    (the original Qwen2-VL / vLLM rule). ``hf5_spatial_advance=True`` instead advances by
    ``max(h, w) / m`` as transformers 5's ``get_rope_index`` does; the two agree for every image
    and for videos whose temporal extent is not longer than their spatial one.

    ``mrope_delta = max(positions) + 1 - L``: the token at absolute index ``p >= L`` (decode) has
    position ``p + mrope_delta`` in all three rows.
    """
    # numpy throughout: this runs in the front end for every prompt (torch's per-op overhead
    # made it ~0.4 ms of host time a W1 prompt)
    arr = np.asarray([int(i) for i in input_ids], dtype=np.int64)
    vision = getattr(config, "vision_config", None)
    merge = int(getattr(vision, "spatial_merge_size", 2))
    tokens_per_second = getattr(vision, "tokens_per_second", None)
    image_id, video_id = int(config.image_token_id), int(config.video_token_id)
    images, videos = _grid_list(image_grid_thw), _grid_list(video_grid_thw)
    if second_per_grid_ts is not None and torch.is_tensor(second_per_grid_ts):
        second_per_grid_ts = second_per_grid_ts.tolist()

    n = len(arr)
    mm_at = np.flatnonzero((arr == image_id) | (arr == video_id))  # placeholder indices, ascending
    chunks: list[np.ndarray] = []
    cur = 0  # position of the next text token
    i = img_i = vid_i = 0
    while i < n:
        tok = int(arr[i])
        if tok == image_id or tok == video_id:
            is_video = tok == video_id
            grids, k = (videos, vid_i) if is_video else (images, img_i)
            if k >= len(grids):
                kind = "video" if is_video else "image"
                raise ValueError(f"qwen2_vl: more {kind} placeholder runs than {kind} grids ({len(grids)})")
            t, h, w = grids[k]
            gh, gw = h // merge, w // merge
            count = t * gh * gw
            if i + count > n or not bool((arr[i : i + count] == tok).all()):
                raise ValueError(
                    f"qwen2_vl: grid {grids[k]} needs {count} consecutive placeholder tokens at index {i}"
                )
            interval = 1.0
            if is_video and tokens_per_second is not None and second_per_grid_ts is not None:
                interval = float(tokens_per_second) * float(second_per_grid_ts[k])
            # float32 product, truncated: as torch's ``(arange(t) * interval).long()``
            tvals = (np.arange(t, dtype=np.float32) * np.float32(interval)).astype(np.int64)
            shape = (t, gh, gw)
            block = np.stack([np.broadcast_to(tvals.reshape(t, 1, 1), shape),
                              np.broadcast_to(np.arange(gh).reshape(1, gh, 1), shape),
                              np.broadcast_to(np.arange(gw).reshape(1, 1, gw), shape)]).reshape(3, -1) + cur
            chunks.append(block)
            cur = cur + max(gh, gw) if hf5_spatial_advance else int(block.max()) + 1
            if is_video:
                vid_i += 1
            else:
                img_i += 1
            i += count
        else:
            nxt = np.searchsorted(mm_at, i)
            j = int(mm_at[nxt]) if nxt < len(mm_at) else n  # the next placeholder, or the end
            chunks.append(np.broadcast_to(np.arange(j - i, dtype=np.int64) + cur, (3, j - i)))
            cur += j - i
            i = j
    if img_i != len(images) or vid_i != len(videos):
        raise ValueError(
            f"qwen2_vl: prompt has {img_i} image / {vid_i} video placeholder runs but "
            f"{len(images)} image / {len(videos)} video grids were given"
        )
    if not chunks:
        return torch.zeros(3, 0, dtype=torch.int64), 0
    positions = torch.from_numpy(np.concatenate(chunks, axis=1).astype(np.int64, copy=False))
    delta = int(positions.max()) + 1 - n
    return positions, delta


def get_mrope_decode_positions(start: int, end: int, mrope_delta: int) -> torch.Tensor:
    """Positions [3, end - start] of tokens at absolute indices start..end-1 (all past the prompt)."""
    return (torch.arange(start, end, dtype=torch.int64) + mrope_delta).view(1, -1).expand(3, -1).contiguous()


# ---------------------------------------------------------------------------------------------
# M-RoPE
# ---------------------------------------------------------------------------------------------


def _text_rope(config: Any) -> tuple[dict, list[int]]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:  # transformers 4.x
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    section = params.get("mrope_section")
    if not section:
        raise ValueError("qwen2_vl: text config has no rope_parameters['mrope_section']")
    return params, [int(s) for s in section]


class MRotaryEmbedding(nn.Module):
    """Multimodal rotary embedding (neox / rotate-half style).

    ``mrope_section`` splits the head_dim/2 frequency bands into (temporal, height, width) parts;
    band ``j`` of section ``i`` rotates by ``position[i % 3] * inv_freq[j]``. Angles are computed in
    fp32 from the positions on each call (as HF does), so fp32 results match HF exactly.
    """

    def __init__(self, config: Any, head_dim: int) -> None:
        super().__init__()
        params, section = _text_rope(config)
        self.rot_dim = head_dim  # full-width rotary (LlamaAttention checks this)
        if sum(section) * 2 != head_dim:
            raise ValueError(f"qwen2_vl: mrope_section {section} must sum to head_dim / 2 = {head_dim // 2}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type in ("default", "mrope"):
            theta = float(params.get("rope_theta", 10000.0))
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
            scaling = 1.0
        else:
            inv_freq, scaling = _rope_inv_freq(config, head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.scaling = scaling
        self.mrope_section = section
        self.head_dim = head_dim

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [3, N] (or [N] for text-only, same position in all rows) -> cos, sin [N, head_dim]
        if positions.dim() == 1:
            positions = positions.view(1, -1).expand(3, -1)
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)  # [3, N, D/2]
        parts = freqs.split(self.mrope_section, dim=-1)
        freqs = torch.cat([p[i % 3] for i, p in enumerate(parts)], dim=-1)  # [N, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        return cos.to(dtype), sin.to(dtype)

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin [N, 1, head_dim] in ``dtype``: computed once per forward, shared by all layers."""
        cos, sin = self.cos_sin(positions, dtype)
        return cos[:, None, :], _sign_sin(sin)[:, None, :]

    def apply(self, x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [N, heads, D] (q and k heads together) rotated by a ``table`` result."""
        return _apply_rotary_signed(x, table[0], table[1], self.head_dim)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [3, N]; q: [N, H, D]; k: [N, Hkv, D]
        cos, sin = self.cos_sin(positions, q.dtype)
        cos, sin = cos[:, None, :], sin[:, None, :]
        return _apply_rotary(q, cos, sin, self.head_dim), _apply_rotary(k, cos, sin, self.head_dim)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def _lm_config(text_config: Any) -> Any:
    """A copy of the text config that our LlamaModel builds the Qwen2-VL decoder from."""
    layer_types = getattr(text_config, "layer_types", None) or []
    if getattr(text_config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        raise ValueError("qwen2_vl: sliding-window attention layers are not supported")
    params, _ = _text_rope(text_config)
    return SimpleNamespace(
        vocab_size=text_config.vocab_size,
        hidden_size=text_config.hidden_size,
        intermediate_size=text_config.intermediate_size,
        num_hidden_layers=text_config.num_hidden_layers,
        num_attention_heads=text_config.num_attention_heads,
        num_key_value_heads=getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads,
        # HF's Qwen2-VL attention always uses hidden // heads.
        head_dim=text_config.hidden_size // text_config.num_attention_heads,
        rms_norm_eps=text_config.rms_norm_eps,
        mlp_bias=False,
        # LlamaAttention builds a 1-D rotary table that we replace with MRotaryEmbedding: keep it
        # tiny and plain (4.x configs say rope type "mrope", which the 1-D builder does not know).
        max_position_embeddings=1,
        rope_parameters={"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))},
        partial_rotary_factor=1.0,
    )


class Qwen2VLForConditionalGeneration(CausalLMTextMixin, nn.Module):
    """Qwen2-VL over a flattened varlen batch with M-RoPE positions [3, N].

    The runner embeds the prompt itself: ``get_input_embeddings(ids)``, then the rows of the
    ``<|image_pad|>`` / ``<|video_pad|>`` tokens replaced by ``embed_multimodal`` outputs (in
    placeholder order), then ``forward(None, positions, kv_caches, meta, inputs_embeds=...)``.
    """

    uses_mrope = True
    supported_modalities = ("image", "video")
    vision_tower_cls: type = Qwen2VisionTransformer  # Qwen2.5-VL swaps in its own tower

    def __init__(self, hf_config: Any, attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.config = hf_config
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config.text_config
        vision = hf_config.vision_config
        self.text_config, self.vision_config = text, vision
        self.image_token_id = int(hf_config.image_token_id)
        self.video_token_id = int(hf_config.video_token_id)
        self.spatial_merge_size = int(vision.spatial_merge_size)

        self.visual = self.vision_tower_cls(vision)
        lm_cfg = _lm_config(text)
        model = LlamaModel(lm_cfg, attn_backend, qkv_bias=True, o_bias=False)
        for layer in model.layers:
            layer.self_attn.rotary_emb = MRotaryEmbedding(text, lm_cfg.head_dim)
        # forward's positions: [3, N] int64 (a [N] tensor means text-only: same position in all rows)
        self._init_lm_head(
            model,
            text.hidden_size,
            text.vocab_size,
            getattr(hf_config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False),
        )

    # -- vision -------------------------------------------------------------------------------

    def embed_multimodal(self, modality: str, data: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings of every placeholder token of the given items, in order: [num_tokens, hidden].

        image: ``pixel_values`` [P, C*T*p*p] + ``image_grid_thw`` [n, 3], or ``image_embeds``;
        video: ``pixel_values_videos`` + ``video_grid_thw``, or ``video_embeds``. Precomputed
        embeddings are returned as they are. Item ``i`` owns ``num_mm_tokens(grid)[i]`` rows.
        """
        if modality == "image":
            if data.get("image_embeds") is not None:
                return data["image_embeds"]
            pixels, grid = data["pixel_values"], data["image_grid_thw"]
        elif modality == "video":
            if data.get("video_embeds") is not None:
                return data["video_embeds"]
            pixels, grid = data["pixel_values_videos"], data["video_grid_thw"]
        else:
            raise ValueError(f"qwen2_vl: unsupported modality {modality!r}; expected 'image' or 'video'")
        device = self.visual.patch_embed.proj.weight.device
        return self._run_visual(pixels.to(device=device, dtype=self.visual.dtype), _grid_list(grid))

    # Set by the runner on CUDA (``engine.cuda_graphs.EncoderGraphCache``): replays small
    # vision passes from CUDA graphs; None runs the tower eagerly.
    visual_runner: Any = None
    # The tower makes no host syncs or host->device copies, so it can be captured.
    vision_graphs_ok = True

    def _run_visual(self, pixels: torch.Tensor, grid: list[list[int]]) -> torch.Tensor:
        # pixels: [P, C*T*p*p] in the tower's dtype -> [P / m^2, hidden]
        return (self.visual_runner or self.visual)(pixels, grid)

    # Patches per vision-tower pass in ``embed_multimodal_batch`` (bounds activation memory:
    # roughly 40 KB per patch at Qwen2-VL-2B's width in bf16).
    max_patches_per_pass = 32768

    def embed_multimodal_batch(self, modality: str, items: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """``embed_multimodal`` of several items at once: one vision-tower pass over as many of
        them as fit ``max_patches_per_pass`` (attention stays within each image / frame).

        items: one data dict per item (as ``embed_multimodal`` takes); returns one
        [num_tokens_i, hidden] tensor per dict, in order. Dicts with precomputed embeddings are
        returned as they are.
        """
        if modality == "image":
            emb_key, pix_key, grid_key = "image_embeds", "pixel_values", "image_grid_thw"
        elif modality == "video":
            emb_key, pix_key, grid_key = "video_embeds", "pixel_values_videos", "video_grid_thw"
        else:
            raise ValueError(f"qwen2_vl: unsupported modality {modality!r}; expected 'image' or 'video'")
        out: list[torch.Tensor | None] = [None] * len(items)
        todo: list[tuple[int, torch.Tensor, list[list[int]]]] = []
        for i, data in enumerate(items):
            if data.get(emb_key) is not None:
                out[i] = data[emb_key]
            else:
                todo.append((i, data[pix_key], _grid_list(data[grid_key])))
        device = self.visual.patch_embed.proj.weight.device
        dtype = self.visual.dtype
        chunk: list[tuple[int, torch.Tensor, list[list[int]]]] = []
        patches = 0

        def flush() -> None:
            pixels = torch.cat([p.to(device=device, dtype=dtype) for _, p, _ in chunk])
            grid = [g for _, _, gs in chunk for g in gs]
            enc = self._run_visual(pixels, grid)
            sizes = [sum(num_mm_tokens(gs, self.spatial_merge_size)) for _, _, gs in chunk]
            for (i, _, _), e in zip(chunk, enc.split(sizes)):
                out[i] = e

        for item in todo:
            n = item[1].shape[0]
            if chunk and patches + n > self.max_patches_per_pass:
                flush()
                chunk, patches = [], 0
            chunk.append(item)
            patches += n
        if chunk:
            flush()
        return out  # type: ignore[return-value]

    def get_mrope_positions(self, input_ids, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None):
        return get_mrope_positions(input_ids, image_grid_thw, video_grid_thw, self.config, second_per_grid_ts)

    def num_mm_tokens(self, grid_thw) -> list[int]:
        return num_mm_tokens(grid_thw, self.spatial_merge_size)

    # -- weights ------------------------------------------------------------------------------

    @staticmethod
    def _our_name(name: str) -> str:
        for old, new in (
            ("model.visual.", "visual."),
            ("model.language_model.", "model."),
            ("language_model.model.", "model."),
            ("language_model.lm_head.", "lm_head."),
            ("model.lm_head.", "lm_head."),
        ):
            if name.startswith(old):
                return new + name[len(old) :]
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into our parameters; returns the names of parameters loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = self._our_name(hf_name)
            if "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name.startswith("lm_head.")):
                continue
            parts = name.split(".")
            if name.startswith("model.") and len(parts) >= 2 and parts[-2] in _STACKED:
                merged, shard = _STACKED[parts[-2]]
                target = ".".join(parts[:-2] + [merged])
                self.get_submodule(target).load_shard(parts[-1], shard, tensor)
                loaded.add(f"{target}.{parts[-1]}")
                continue
            if name not in params:
                raise ValueError(f"model: unexpected weight {hf_name!r} in checkpoint")
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"model: weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}"
                )
            params[name].data.copy_(tensor)
            loaded.add(name)
        return loaded

