"""Llama-family decoder (Llama, Llama-2/3, Qwen2): our implementation over a paged KV cache.

Module and parameter names follow HF's checkpoints, except that q/k/v and gate/up are stored as
one merged projection each; ``load_weights`` maps the HF names onto them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from engine.models.layers import Linear, MergedLinear, PagedAttention, RMSNorm, RotaryEmbedding, silu_and_mul
from kernels import AttentionBackend, AttentionMetadata, fused_ops

# checkpoint sub-name -> (our merged module, shard index)
_STACKED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(hidden, [self.q_size, self.kv_size, self.kv_size], bias=qkv_bias)
        self.o_proj = Linear(self.q_size, hidden, bias=o_bias)
        self.rotary_emb = RotaryEmbedding(config, self.head_dim, config.max_position_embeddings)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, backend)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # rope: the rotary table of these positions (``rotary_emb.table``), shared by all layers;
        # computed here when not given.
        n = x.shape[0]
        if rope is None:
            rope = self.rotary_emb.table(positions, x.dtype)
        qkv = self.qkv_proj(x)
        # q and k are adjacent in the merged projection: rotate them together (one set of kernels).
        qk = qkv[:, : self.q_size + self.kv_size].view(n, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(n, self.num_kv_heads, self.head_dim)
        if self.rotary_emb.rot_dim == self.head_dim:  # the backend may fuse rotary and KV write
            return self.o_proj(self.attn.forward_rotary(qk, v, rope, kv_cache, meta))
        qk = self.rotary_emb.apply(qk, rope)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden, [intermediate, intermediate], bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, hidden] -> [N, hidden]
        h = self.gate_up_proj(x)  # [N, 2 * intermediate]
        if x.dim() == 2:  # decode-sized batches: the activation fused into down_proj's GEMV
            return fused_ops.silu_and_mul_linear(h, self.down_proj.weight, self.down_proj.bias)
        return self.down_proj(silu_and_mul(h))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, backend, qkv_bias, o_bias)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block in vLLM's residual-carrying form: returns (mlp output, residual stream) whose
        sum is the block's output; the next block's (or the final) norm adds them in one pass.

        x: [N, hidden], this layer's input when ``residual`` is None (first layer), else the
        previous layer's MLP output with ``residual`` the stream before it (its sum with x is the
        input). Same values as ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``.
        """
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, kv_cache, meta, rope)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, backend, qkv_bias, o_bias) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        # Every layer has the same rotary embedding: index / compute its cos-sin table once.
        rope = self.layers[0].self_attn.rotary_emb.table(positions, self.embed_tokens.weight.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, meta, rope)
        if residual is None:  # no layers
            return self.norm(x)
        return self.norm(x, residual)[0]


class CausalLMTextMixin:
    """The text side shared by our causal LMs and VLMs: a ``LlamaModel`` plus an LM head.

    ``text_lm()`` names the module that holds ``model`` (a ``LlamaModel``), ``tie_word_embeddings``
    and, when untied, ``lm_head``: the model itself by default, its ``language_model`` for LLaVA.
    """

    def text_lm(self) -> Any:
        return self

    def _init_lm_head(self, model: LlamaModel, hidden_size: int, vocab_size: int, tie_word_embeddings: bool) -> None:
        """Attach ``model``, the LM head (none when tied) and the KV-cache geometry."""
        self.model = model
        self.tie_word_embeddings = bool(tie_word_embeddings)
        if not self.tie_word_embeddings:
            self.lm_head = Linear(hidden_size, vocab_size, bias=False)
        self.num_layers = len(model.layers)
        attn = model.layers[0].self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_lm().model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # input_ids: [N]; positions: [N] ([3, N] under M-RoPE); returns hidden states [N, hidden]
        return self.text_lm().model(input_ids, positions, kv_caches, meta, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """hidden: [M, hidden] -> logits [M, vocab], in fp32 (``upcast=False``: the model's dtype,
        for the sampler, which upcasts only what computes with them). A decode batch of <= 8
        rows takes the Triton GEMV, tied or not: the head is Qwen2-VL-2B's largest weight read."""
        lm = self.text_lm()
        weight = lm.model.embed_tokens.weight if lm.tie_word_embeddings else lm.lm_head.weight
        logits = fused_ops.linear(hidden, weight)
        return logits.float() if upcast else logits


class LlamaForCausalLM(CausalLMTextMixin, nn.Module):
    """Causal LM over a flattened batch: ``forward`` -> hidden states, ``compute_logits`` -> logits."""

    qkv_bias = False

    def __init__(self, config: Any, backend: AttentionBackend) -> None:
        super().__init__()
        config = config.get_text_config()
        self.config = config
        attention_bias = getattr(config, "attention_bias", False)
        qkv_bias = self.qkv_bias or attention_bias
        self._init_lm_head(
            LlamaModel(config, backend, qkv_bias, o_bias=attention_bias),
            config.hidden_size,
            config.vocab_size,
            getattr(config, "tie_word_embeddings", False),
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into our parameters; returns the names of parameters loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name.startswith("lm_head.")):
                continue
            name = name.removeprefix("language_model.")  # some multimodal checkpoints nest the LM
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in _STACKED:
                merged, shard = _STACKED[parts[-2]]
                target = ".".join(parts[:-2] + [merged])
                module = self.get_submodule(target)
                module.load_shard(parts[-1], shard, tensor)
                loaded.add(f"{target}.{parts[-1]}")
                continue
            if name not in params:
                raise ValueError(f"model: unexpected weight {name!r} in checkpoint")
            params[name].data.copy_(tensor)
            loaded.add(name)
        return loaded


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 is Llama with biases on q/k/v (and not on o)."""

    qkv_bias = True
