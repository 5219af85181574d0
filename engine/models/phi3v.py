"""Phi-3-vision / Phi-3.5-vision (``Phi3VForCausalLM``; also VLM2Vec, served with task="embed").

* ``vision_embed_tokens.img_processor`` — our ``CLIPVisionModel`` with CLIP ViT-L/14-336's shape,
  built up to ``img_processor["layer_idx"]`` (-2: the penultimate layer's output); the CLS token is
  dropped (``type_feature="patch"``): 24x24 features of width C=1024 per 336x336 crop.
* HD transform (``embd_layer``: ``use_hd_transform``, learnable separators, order "sub_glb"): each
  crop's 24x24 grid is merged 2x2 into 12x12 features of width 4C; an image's ``hc x wc`` crops are
  tiled into one ``(hc*12) x (wc*12)`` grid, each row followed by ``sub_GN`` (a learned "newline");
  then ``glb_GN`` once; then the global (whole image at 336x336) 12x12 grid, again with a
  ``sub_GN`` per row. Rows: ``hc*12*(wc*12+1) + 1 + 12*13`` — the processor's formula
  ``(hc*wc + 1)*144 + 1 + (hc + 1)*12``.
* ``img_projection`` — ``Linear(4C, H) -> GELU -> Linear(H, H)`` onto the LM's hidden size.
* ``language_model`` — our ``Phi3ForCausalLM``; image features replace the rows of the
  ``<|image|>`` placeholder tokens (plain 1-D positions).

The published config.json has no vision config (the tower is hard-wired to ViT-L/14-336);
``img_processor["vision_config"]``, a dict of ``CLIPVisionConfig`` fields, overrides that shape
(a vlmserve extension that tiny test checkpoints use).

Checkpoint names (as published): ``model.embed_tokens.*``, ``model.layers.*``, ``model.norm.*``,
``lm_head.*``, ``model.vision_embed_tokens.{img_processor.vision_model.*, glb_GN, sub_GN,
img_projection.{0,2}.*}`` and possibly ``model.vision_embed_tokens.wte.weight`` (the same
embedding table as ``model.embed_tokens``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from engine.models.clip import CLIPVisionModel, resolve_feature_layers
from engine.models.llama import CausalLMTextMixin
from engine.models.phi3 import Phi3ForCausalLM
from kernels import AttentionBackend

__all__ = ["Phi3VForCausalLM", "phi3v_vision_config"]

# openai/clip-vit-large-patch14-336, the tower every published Phi-3-vision checkpoint uses.
_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)


def phi3v_vision_config(hf_config: Any) -> Any:
    """The CLIP tower's config: ViT-L/14-336, with ``img_processor["vision_config"]`` overrides."""
    from transformers import CLIPVisionConfig

    img = dict(getattr(hf_config, "img_processor", None) or {})
    if img.get("name", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"phi3v: img_processor {img.get('name')!r} is not supported; expected clip_vision_model")
    return CLIPVisionConfig(**{**_CLIP_L_336, **dict(img.get("vision_config") or {})})


class Phi3HDImageEmbedding(nn.Module):
    """CLIP crops -> HD-transformed, projected image embeddings."""

    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        img = dict(hf_config.img_processor)
        embd = dict(getattr(hf_config, "embd_layer", None) or {})
        if not (embd.get("use_hd_transform") and embd.get("with_learnable_separator")):
            raise ValueError("phi3v: only the HD transform with learnable separators (Phi-3-vision's) is supported")
        if embd.get("hd_transform_order", "glb_sub") != "sub_glb":
            raise ValueError(f"phi3v: hd_transform_order {embd.get('hd_transform_order')!r} is not supported")
        if embd.get("projection_cls", "mlp") != "mlp":
            raise ValueError(f"phi3v: projection_cls {embd.get('projection_cls')!r} is not supported; expected mlp")
        if img.get("type_feature", "patch") != "patch":
            raise ValueError(f"phi3v: type_feature {img.get('type_feature')!r} is not supported; expected patch")
        vision = phi3v_vision_config(hf_config)
        self.feature_layer = resolve_feature_layers(vision.num_hidden_layers, int(img.get("layer_idx", -2)))[0]
        self.grid = vision.image_size // vision.patch_size  # 24 features a side per crop
        if self.grid % 2:
            raise ValueError(f"phi3v: a crop's {self.grid}x{self.grid} feature grid cannot be merged 2x2")
        dim = int(img.get("image_dim_out", vision.hidden_size))
        if dim != vision.hidden_size:
            raise ValueError(f"phi3v: image_dim_out {dim} differs from the tower's hidden size {vision.hidden_size}")
        self.image_dim_out = dim
        self.img_processor = CLIPVisionModel(vision, num_hidden_layers=self.feature_layer)
        self.glb_GN = nn.Parameter(torch.empty(1, 1, 4 * dim))
        self.sub_GN = nn.Parameter(torch.empty(1, 1, 1, 4 * dim))
        hidden = hf_config.hidden_size
        self.img_projection = nn.Sequential(nn.Linear(4 * dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def crop_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] -> 2x2-merged patch features [N, g/2, g/2, 4C]."""
        tower = self.img_processor
        (x,) = tower(pixel_values.to(device=tower.device, dtype=tower.dtype), [self.feature_layer])
        x = x[:, 1:]  # drop CLS: [N, g*g, C]
        n, h = x.shape[0], self.grid // 2
        # [N, g/2, 2, g/2, 2, C] -> [N, g/2, g/2, 2, 2, C]: each merged feature is its 2x2 block,
        # row-major (top-left, top-right, bottom-left, bottom-right), concatenated channel-wise.
        return x.reshape(n, h, 2, h, 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(n, h, h, -1)

    def _with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """[rows, cols, 4C] -> [rows * (cols + 1), 4C]: ``sub_GN`` after every row."""
        newline = self.sub_GN.reshape(1, 1, -1).to(grid.dtype).expand(grid.shape[0], 1, -1)
        return torch.cat([grid, newline], dim=1).flatten(0, 1)

    def hd_transform(self, merged: torch.Tensor, crops_hw: tuple[int, int]) -> torch.Tensor:
        """merged [1 + hc*wc, g/2, g/2, 4C] (global crop first) -> rows [num_image_tokens, 4C]."""
        hc, wc = crops_hw
        h = merged.shape[1]
        # Tile the sub-crops (row-major) into one (hc*h) x (wc*h) grid.
        subs = merged[1 : 1 + hc * wc].reshape(hc, wc, h, h, -1).permute(0, 2, 1, 3, 4).reshape(hc * h, wc * h, -1)
        return torch.cat([
            self._with_newlines(subs),
            self.glb_GN.reshape(1, -1).to(merged.dtype),
            self._with_newlines(merged[0]),
        ])

    def forward(self, pixel_values: Sequence[torch.Tensor], crops_hw: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Per image: pixel_values [1 + hc*wc, 3, S, S] (global first) and its (hc, wc) ->
        embeddings [num_image_tokens, hidden]; all crops go through the tower in one pass."""
        counts = [p.shape[0] for p in pixel_values]
        merged = self.crop_features(torch.cat(list(pixel_values)))
        outs = []
        for part, hw in zip(merged.split(counts), crops_hw):
            rows = self.hd_transform(part, hw)
            outs.append(self.img_projection(rows.to(self.img_projection[0].weight.dtype)))
        return outs


class Phi3VForCausalLM(CausalLMTextMixin, nn.Module):
    """Phi-3-vision over a flattened varlen batch with 1-D positions (see engine.models.llava for
    how the runner merges image rows into the token embeddings)."""

    uses_mrope = False
    supported_modalities = ("image",)
    takes_max_model_len = True

    def __init__(self, hf_config: Any, attn_backend: AttentionBackend, max_model_len: int | None = None) -> None:
        super().__init__()
        self.config = hf_config
        self.vision_embed_tokens = Phi3HDImageEmbedding(hf_config)
        self.language_model = Phi3ForCausalLM(hf_config, attn_backend, max_model_len)
        self.num_layers = self.language_model.num_layers
        self.num_kv_heads = self.language_model.num_kv_heads
        self.head_dim = self.language_model.head_dim

    def text_lm(self) -> Any:
        return self.language_model

    # -- vision -------------------------------------------------------------------------------

    @staticmethod
    def _crops_hw(data: dict[str, torch.Tensor]) -> tuple[int, int]:
        hc, wc = (int(v) for v in data["crops_hw"])  # a host tensor (DevicePreprocessor host key)
        if data["pixel_values"].shape[0] != 1 + hc * wc:
            raise ValueError(f"phi3v: {data['pixel_values'].shape[0]} crops given for a {hc}x{wc} crop grid + global")
        return hc, wc

    def embed_multimodal(self, modality: str, data: dict[str, torch.Tensor]) -> torch.Tensor:
        """One image's embeddings [num_image_tokens, hidden]: from ``pixel_values``
        [1 + hc*wc, 3, S, S] + ``crops_hw`` (hc, wc), or ``image_embeds`` returned as they are."""
        return self.embed_multimodal_batch(modality, [data])[0]

    def embed_multimodal_batch(self, modality: str, items: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Several images, their crops in one tower pass; precomputed embeddings pass through."""
        if modality != "image":
            raise ValueError(f"phi3v: unsupported modality {modality!r}; expected 'image'")
        pixel_items = [d for d in items if d.get("image_embeds") is None]
        encoded = iter(self.vision_embed_tokens(
            [d["pixel_values"] for d in pixel_items], [self._crops_hw(d) for d in pixel_items]
        ) if pixel_items else [])
        return [d["image_embeds"] if d.get("image_embeds") is not None else next(encoded) for d in items]

    # -- weights ------------------------------------------------------------------------------

    def _vision_name(self, name: str) -> str | None:
        """Our parameter name of a ``model.vision_embed_tokens.*`` tensor, or None to skip it."""
        name = "vision_embed_tokens." + name[len("model.vision_embed_tokens."):]
        tower = "vision_embed_tokens.img_processor."
        if name.startswith(tower + "vision_model."):
            name = tower + name[len(tower + "vision_model."):]
        if name.startswith((tower + "post_layernorm.", tower + "embeddings.position_ids")):
            return None  # the pooled output and a buffer: never used
        if name.startswith(tower + "encoder.layers."):
            index = int(name[len(tower + "encoder.layers."):].split(".", 1)[0])
            if index >= self.vision_embed_tokens.img_processor.num_hidden_layers:
                return None  # past the feature layer: not built
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into our parameters; returns the names of parameters loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def lm_weights() -> Iterable[tuple[str, torch.Tensor]]:
            for hf_name, tensor in weights:
                if hf_name == "model.vision_embed_tokens.wte.weight":
                    yield "model.embed_tokens.weight", tensor  # the LM's table, shared
                    continue
                if not hf_name.startswith("model.vision_embed_tokens."):
                    yield hf_name, tensor  # model.* / lm_head.*: the Phi-3 loader's
                    continue
                name = self._vision_name(hf_name)
                if name is None:
                    continue
                if name not in params:
                    raise ValueError(f"model: unexpected weight {hf_name!r} in checkpoint")
                if params[name].shape != tensor.shape:
                    raise ValueError(f"model: weight {hf_name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(params[name].shape)}")
                params[name].data.copy_(tensor)
                loaded.add(name)

        loaded |= {f"language_model.{n}" for n in self.language_model.load_weights(lm_weights())}
        return loaded
