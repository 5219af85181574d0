"""MiniCPM-V 2.6 (``MiniCPMV``): Qwen2 + a NaViT SigLIP tower + the perceiver resampler.

* ``vpm`` — ``NavitSiglipVisionModel`` with ``config.vision_config``'s shape (SigLIP-400M /
  patch 14 / 980 positions in the published checkpoint), minus its last layer when
  ``drop_vision_last_layer``; every overview / slice of an image is one variable-size input.
* ``resampler`` — ``Resampler(query_num, hidden, hidden // 128 heads, kv_dim = tower width)``:
  ``query_num`` (64) rows of the LM's width per slice.
* ``llm`` — our ``Qwen2ForCausalLM``; each slice's rows replace its run of ``<unk>`` placeholder
  tokens (the processor makes every slice a feature of its own), with plain 1-D positions.

The published config.json is a Qwen2 config plus ``vision_config``, ``query_num``, ``version``,
... (built natively: ``engine.hf_configs``). Only version 2.6 is implemented: 2.0 / 2.5 use other
language models, resampler variants and prompt formats.

Checkpoint names (as published): ``llm.model.*``, ``llm.lm_head.*``, ``vpm.*`` (our tower's
names), ``resampler.*`` (our resampler's names).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from engine.models.llama import CausalLMTextMixin, Qwen2ForCausalLM
from engine.models.minicpmv_resampler import Resampler
from engine.models.siglip_navit import NavitSiglipVisionModel
from kernels import AttentionBackend

__all__ = ["MiniCPMV", "minicpmv_vision_config"]

# The published MiniCPMVConfig's default vision_config (SigLIP so400m, patch 14, 980x980 positions).
_SIGLIP_400M = dict(hidden_size=1152, image_size=980, intermediate_size=4304, num_attention_heads=16,
                    num_hidden_layers=27, patch_size=14)


def minicpmv_vision_config(hf_config: Any) -> Any:
    """The tower's ``SiglipVisionConfig``: the published defaults overridden by ``vision_config``."""
    from transformers import SiglipVisionConfig

    vision = getattr(hf_config, "vision_config", None) or {}
    if not isinstance(vision, dict):
        vision = vision.to_dict()
    fields = {k: v for k, v in {**_SIGLIP_400M, **vision}.items() if k != "model_type"}
    return SiglipVisionConfig(**fields)


class MiniCPMV(CausalLMTextMixin, nn.Module):
    """MiniCPM-V 2.6 over a flattened varlen batch (see engine.models.llava for how the runner
    merges image rows into the token embeddings)."""

    uses_mrope = False
    supported_modalities = ("image",)

    def __init__(self, hf_config: Any, attn_backend: AttentionBackend) -> None:
        super().__init__()
        version = str(getattr(hf_config, "version", "2.6"))
        if version != "2.6":
            raise ValueError(f"minicpmv: version {version} is not supported; only MiniCPM-V 2.6 is")
        self.config = hf_config
        vision = minicpmv_vision_config(hf_config)
        layers = vision.num_hidden_layers - (1 if getattr(hf_config, "drop_vision_last_layer", False) else 0)
        self.vpm = NavitSiglipVisionModel(vision, num_hidden_layers=layers)
        hidden = int(hf_config.hidden_size)
        if hidden < 128:
            raise ValueError(f"minicpmv: hidden_size {hidden} leaves the resampler no heads (it has hidden // 128)")
        self.resampler = Resampler(int(hf_config.query_num), hidden, hidden // 128, vision.hidden_size)
        self.llm = Qwen2ForCausalLM(hf_config, attn_backend)
        self.num_layers = self.llm.num_layers
        self.num_kv_heads = self.llm.num_kv_heads
        self.head_dim = self.llm.head_dim

    def text_lm(self) -> Any:
        return self.llm

    # -- vision -------------------------------------------------------------------------------

    def embed_multimodal(self, modality: str, data: dict[str, torch.Tensor]) -> torch.Tensor:
        """One overview / slice -> its rows [query_num, hidden]: from ``patches`` [h*w, 3*p*p] +
        ``tgt_size`` (h, w), or ``image_embeds`` returned as they are."""
        return self.embed_multimodal_batch(modality, [data])[0]

    def embed_multimodal_batch(self, modality: str, items: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Several slices through the tower and the resampler in one padded pass; precomputed
        embeddings pass through."""
        if modality != "image":
            raise ValueError(f"minicpmv: unsupported modality {modality!r}; expected 'image'")
        pixel_items = [d for d in items if d.get("image_embeds") is None]
        encoded: Iterable[torch.Tensor] = iter(())
        if pixel_items:
            grids = [tuple(int(v) for v in d["tgt_size"]) for d in pixel_items]  # host tensors
            feats = self.vpm([d["patches"] for d in pixel_items], grids)  # [B, L, vision width]
            encoded = iter(self.resampler(feats.to(self.resampler.proj.dtype), grids))  # [B, Q, hidden]
        return [d["image_embeds"] if d.get("image_embeds") is not None else next(encoded) for d in items]

    # -- weights ------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into our parameters; returns the names of parameters loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        built_layers = len(self.vpm.encoder.layers)

        def lm_weights() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.startswith("llm."):
                    yield name[len("llm."):], tensor  # model.* / lm_head.*: the Qwen2 loader's
                    continue
                if name.startswith("vpm.head.") or name.endswith("position_ids"):
                    continue  # SigLIP's pooling head and buffers: never used
                if name.startswith("vpm.encoder.layers.") and int(name.split(".")[3]) >= built_layers:
                    continue  # the dropped last layer
                if name not in params:
                    raise ValueError(f"model: unexpected weight {name!r} in checkpoint")
                if params[name].shape != tensor.shape:
                    raise ValueError(f"model: weight {name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(params[name].shape)}")
                params[name].data.copy_(tensor)
                loaded.add(name)

        loaded |= {f"llm.{n}" for n in self.llm.load_weights(lm_weights())}
        return loaded
