"""Phi-3 decoder (``Phi3ForCausalLM``; the language model of Phi-3-vision / Phi-3.5-vision).

Phi-3 is our Llama decoder with two differences:

* the checkpoint stores q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` (in that
  order), which is exactly our merged layout: those tensors load as they are;
* rotary embedding with LongRoPE ("su" / "longrope" in ``rope_scaling``): per-frequency
  ``short_factor`` / ``long_factor`` rescaling plus a cos/sin scale
  ``sqrt(1 + ln(max_position_embeddings / original) / ln(original))``.

LongRoPE choice of factors: HF switches the whole sequence to ``long_factor`` once it is longer
than ``original_max_position_embeddings``, recomputing every position; a paged KV cache cannot
re-rotate cached keys, so (as vLLM does) the choice is made once for the engine: ``long_factor``
everywhere when ``max_model_len`` exceeds the original length, ``short_factor`` otherwise. With
``max_model_len <= original_max_position_embeddings`` (Phi-3.5-vision: 4096) this equals HF for
every sequence; above it, it equals HF for sequences longer than the original length.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from engine.models.layers import RotaryEmbedding
from engine.models.llama import LlamaForCausalLM, LlamaModel
from kernels import AttentionBackend

__all__ = ["Phi3ForCausalLM", "Phi3RotaryEmbedding"]


def _rope_dict(config: Any) -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


class Phi3RotaryEmbedding(RotaryEmbedding):
    """``RotaryEmbedding`` (same ``table`` / ``apply`` interface) for positions ``[0, max_positions)``
    with Phi-3's default or LongRoPE frequencies; one instance is shared by all layers."""

    def __init__(self, config: Any, head_dim: int, max_positions: int) -> None:
        nn.Module.__init__(self)
        params = _rope_dict(config)
        rope_type = params.get("rope_type", params.get("type", "default"))
        partial = float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0)
        rot_dim = int(head_dim * partial)
        exponents = torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim
        base_freq = float(params["rope_theta"]) ** exponents  # [rot_dim / 2]
        scale = 1.0
        if rope_type in ("su", "longrope"):
            original = int(params.get("original_max_position_embeddings")
                           or getattr(config, "original_max_position_embeddings"))
            use_long = max_positions > original
            factors = torch.tensor(params["long_factor" if use_long else "short_factor"], dtype=torch.float32)
            if factors.numel() != rot_dim // 2:
                raise ValueError(f"phi3: rope factors have {factors.numel()} entries, expected {rot_dim // 2}")
            base_freq = base_freq * factors
            scale = params.get("attention_factor")
            if scale is None:  # LongRoPE's default, from the context extension ratio
                ratio = float(params.get("factor") or config.max_position_embeddings / original)
                scale = 1.0 if ratio <= 1.0 else math.sqrt(1 + math.log(ratio) / math.log(original))
            scale = float(scale)
        elif rope_type != "default":
            raise ValueError(f"phi3: unsupported rope type {rope_type!r}; expected default, su or longrope")
        inv_freq = 1.0 / base_freq
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_positions, rot_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        # fp32, cast per call (as HF keeps cos/sin in fp32 before casting), so fp32 runs match HF.
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)
        self.rot_dim = rot_dim


def _layer_config(config: Any) -> Any:
    """A copy of ``config`` whose rope is plain and one position long: the decoder layers build
    their own rotary tables from the config, and those are replaced by one shared
    ``Phi3RotaryEmbedding`` right after (a 128k-position table per layer would cost GBs)."""
    cfg = copy.copy(config)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": float(_rope_dict(config)["rope_theta"])}
    cfg.rope_scaling = None
    cfg.max_position_embeddings = 1
    return cfg


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 over a flattened varlen batch; ``max_model_len`` sizes the rotary table and picks the
    LongRoPE factors (see the module docstring)."""

    takes_max_model_len = True

    def __init__(self, config: Any, backend: AttentionBackend, max_model_len: int | None = None) -> None:
        nn.Module.__init__(self)
        config = config.get_text_config()
        self.config = config
        window = getattr(config, "sliding_window", None)
        max_len = int(max_model_len or config.max_position_embeddings)
        if window is not None and window < max_len:
            raise ValueError(
                f"phi3: sliding_window={window} is shorter than max_model_len={max_len}; sliding-window "
                "attention is not supported (lower max_model_len)"
            )
        model = LlamaModel(_layer_config(config), backend, qkv_bias=False, o_bias=False)
        attn0 = model.layers[0].self_attn
        rotary = Phi3RotaryEmbedding(config, attn0.head_dim, max_len)
        for layer in model.layers:
            layer.self_attn.rotary_emb = rotary
        self._init_lm_head(model, config.hidden_size, config.vocab_size, getattr(config, "tie_word_embeddings", False))
