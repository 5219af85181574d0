"""CLIP vision encoder (ViT): our implementation, for vision-language models that use a CLIP tower.

``CLIPVisionModel(config, num_hidden_layers)`` builds the patch embedding (a stride-p conv without
bias), the class embedding and learned position embedding, ``pre_layrnorm`` and the first
``num_hidden_layers`` pre-LN encoder layers (LayerNorm, multi-head attention with biased q/k/v/out
projections, MLP with ``config.hidden_act``: quick_gelu for CLIP). A tower that only feeds a
middle layer to an LM (LLaVA's ``vision_feature_layer=-2``) never builds or runs the layers
after it; ``post_layernorm`` is not built (no VLM uses the pooled output).

``forward(pixel_values [B, C, H, W], layers) -> [hidden_states[i] for i in layers]`` where
``hidden_states`` is numbered as HF's ``output_hidden_states``: 0 is the embeddings after
``pre_layrnorm``, ``i`` the output of encoder layer ``i`` (1-based), each ``[B, 1 + (H/p)*(W/p), D]``.

Parameter names follow the HF checkpoint's sub-names below the tower (``embeddings.*``,
``pre_layrnorm.*``, ``encoder.layers.{i}.*``), as transformers 5 names them (4.x checkpoints add a
``vision_model.`` level; the VLM's ``load_weights`` removes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.layers import activation

__all__ = ["CLIPVisionModel", "resolve_feature_layers"]


def resolve_feature_layers(num_hidden_layers: int, layers: int | Sequence[int]) -> list[int]:
    """HF ``hidden_states`` indices (negative ones count from the end of the full tower) -> 0..L."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for k in layers:
        idx = int(k) + num_hidden_layers + 1 if int(k) < 0 else int(k)
        if not 0 <= idx <= num_hidden_layers:
            raise ValueError(
                f"clip: vision feature layer {k} is out of range for a tower of {num_hidden_layers} layers"
            )
        out.append(idx)
    return out


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            getattr(config, "num_channels", 3), self.embed_dim,
            kernel_size=self.patch_size, stride=self.patch_size, bias=False,
        )
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_patches + 1, self.embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, C, H, W] -> [B, 1 + num_patches, D]
        b, _, h, w = pixel_values.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"clip: input image size ({h}x{w}) does not match the tower's {self.image_size}x{self.image_size}"
            )
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(b, 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight.unsqueeze(0)


class CLIPAttention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f"clip: hidden_size {self.embed_dim} is not divisible by {self.num_heads} heads")
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, T, D]; full (non-causal) attention within each image; key_mask: [B, 1, 1, T] bool
        # (True = a real patch) where images of several sizes are padded into one batch (SigLIP)
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=self.scale)  # [B, H, T, Dh]
        return self.out_proj(o.transpose(1, 2).reshape(b, t, self.embed_dim))


class CLIPMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        eps = getattr(config, "layer_norm_eps", 1e-5)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: Any, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(num_layers))


class CLIPVisionModel(nn.Module):
    """CLIP's ViT up to layer ``num_hidden_layers`` (default: all of ``config.num_hidden_layers``)."""

    def __init__(self, config: Any, num_hidden_layers: int | None = None) -> None:
        super().__init__()
        self.config = config
        n = config.num_hidden_layers if num_hidden_layers is None else int(num_hidden_layers)
        if not 0 <= n <= config.num_hidden_layers:
            raise ValueError(f"clip: cannot build {n} of {config.num_hidden_layers} layers")
        self.num_hidden_layers = n
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=getattr(config, "layer_norm_eps", 1e-5))
        self.encoder = CLIPEncoder(config, n)

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.patch_embedding.weight.device

    def forward(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """pixel_values [B, C, H, W] -> hidden states [B, 1 + P, D] at each index of ``layers`` (0..built)."""
        layers = list(layers)
        if any(not 0 <= i <= self.num_hidden_layers for i in layers):
            raise ValueError(
                f"clip: hidden-state indices {layers} need more than the {self.num_hidden_layers} built layers"
            )
        wanted = set(layers)
        states: dict[int, torch.Tensor] = {}
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        if 0 in wanted:
            states[0] = x
        last = max(layers, default=0)
        for i, layer in enumerate(self.encoder.layers[:last], start=1):
            x = layer(x)
            if i in wanted:
                states[i] = x
        return [states[i] for i in layers]
