"""SigLIP vision encoder with NaViT-style variable resolution (MiniCPM-V 2.6's ``vpm``).

The same network as HF's ``SiglipVisionModel`` (patch embedding = a stride-p conv with bias,
learned position embedding over a ``(S/p) x (S/p)`` grid, pre-LN encoder layers with biased
q/k/v/out projections and a ``gelu_pytorch_tanh`` MLP, ``post_layernorm``; no attention-pooling
head), run on images of any size that is a whole number of patches, several per pass:

* input: per image its patches ``[h*w, 3*p*p]`` (row-major, each channel-major ``(c, ky, kx)``:
  ``minicpmv_pixels``) and its patch grid ``(h, w)``; images are padded to the longest and padded
  keys are masked, so an image's output does not depend on what it is batched with.
* positions: the published NaViT rule — patch row i of h sits at fraction ``i/h``, bucketed into
  the tower's ``S/p`` position rows (likewise columns), so any grid maps onto the learned table
  without interpolation (``navit_position_ids``; float32 arithmetic exactly as published).

Parameter names follow the checkpoint below ``vpm.``: ``embeddings.{patch_embedding,
position_embedding}.*``, ``encoder.layers.{i}.{layer_norm1, self_attn.{q,k,v,out}_proj,
layer_norm2, mlp.fc1, mlp.fc2}.*``, ``post_layernorm.*``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.clip import CLIPEncoderLayer

__all__ = ["NavitSiglipVisionModel", "navit_position_ids"]


def navit_position_ids(grid_h: int, grid_w: int, side: int) -> torch.Tensor:
    """Position-table indices [grid_h * grid_w] (row-major) of a ``grid_h x grid_w`` patch grid on
    a tower whose table is ``side x side``: the published ``arange`` / ``bucketize`` in float32."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    # 1 / int32 tensor: the reciprocal is taken in float32, as the published code does with tgt_sizes.
    frac_h = torch.arange(0, 1 - 1e-6, float(1 / torch.tensor(grid_h, dtype=torch.int32)))
    frac_w = torch.arange(0, 1 - 1e-6, float(1 / torch.tensor(grid_w, dtype=torch.int32)))
    rows = torch.bucketize(frac_h, boundaries, right=True)
    cols = torch.bucketize(frac_w, boundaries, right=True)
    return (rows[:, None] * side + cols).flatten()


class SiglipEmbeddings(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.side = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size,
                                         kernel_size=self.patch_size, stride=self.patch_size)
        self.position_embedding = nn.Embedding(self.side * self.side, config.hidden_size)


class SiglipEncoder(nn.Module):
    def __init__(self, config: Any, num_layers: int) -> None:
        super().__init__()
        # SigLIP's encoder layer is CLIP's: the same weights and arithmetic, with a key mask
        # for the padding of a batch of images of several sizes.
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(num_layers))


class NavitSiglipVisionModel(nn.Module):
    """SigLIP's ViT with ``num_hidden_layers`` layers (MiniCPM-V drops the last one when its
    config says ``drop_vision_last_layer``) and ``post_layernorm``."""

    def __init__(self, config: Any, num_hidden_layers: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.embeddings = SiglipEmbeddings(config)
        n = config.num_hidden_layers if num_hidden_layers is None else int(num_hidden_layers)
        self.encoder = SiglipEncoder(config, n)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_layernorm.weight.device

    def forward(self, patches: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Per image: patches [h*w, 3*p*p] and (h, w) -> features [B, max h*w, D] (rows past an
        image's h*w are padding)."""
        lengths = [h * w for h, w in grids]
        for p, n in zip(patches, lengths):
            if p.shape[0] != n:
                raise ValueError(f"siglip: {p.shape[0]} patches given for a grid of {n}")
        emb = self.embeddings
        weight = emb.patch_embedding.weight  # [D, 3, p, p]: a linear map of the flattened patch
        x = nn.utils.rnn.pad_sequence([p.to(weight.dtype) for p in patches], batch_first=True)  # [B, L, 3*p*p]
        x = F.linear(x, weight.flatten(1), emb.patch_embedding.bias)  # [B, L, D]
        pos = torch.zeros(x.shape[:2], dtype=torch.long)
        for i, (h, w) in enumerate(grids):
            pos[i, : h * w] = navit_position_ids(h, w, emb.side)
        x = x + emb.position_embedding(pos.to(x.device))
        key_mask = None
        if min(lengths) != x.shape[1]:  # some image is padded: its padding is no key for anyone
            valid = torch.arange(x.shape[1])[None, :] < torch.tensor(lengths)[:, None]  # [B, L]
            key_mask = valid.to(x.device)[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, key_mask)
        return self.post_layernorm(x)
