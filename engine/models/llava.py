"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP vision tower + 2-layer MLP projector + Llama.

* ``vision_tower`` — our ``CLIPVisionModel``, built only up to the deepest ``vision_feature_layer``
  (LLaVA-1.5 uses -2: the second-to-last layer's output; the last layer is never built or run).
* ``vision_feature_select_strategy`` — "default" drops the CLS token (``(S/p)^2`` features per
  image), "full" keeps it (``(S/p)^2 + 1``). A list of feature layers concatenates the selected
  hidden states along the channel axis (the projector's input is ``D * len(layers)``).
* ``multi_modal_projector`` — ``linear_2(act(linear_1(x)))`` with ``projector_hidden_act``.
* ``language_model`` — our ``LlamaForCausalLM`` on ``hf_config.text_config`` (Llama / Vicuna;
  Mistral without a sliding window; ``Qwen2ForCausalLM`` for a Qwen2 text config); positions are
  1-D (no M-RoPE): an image's tokens are ordinary consecutive positions.

Checkpoint layouts accepted by ``load_weights``:

* transformers 5.x ``save_pretrained``: ``vision_tower.{embeddings,pre_layrnorm,encoder,post_layernorm}.*``,
  ``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.*``;
* 4.x / llava-hf hub checkpoints: the same with ``vision_tower.vision_model.*``;
* in-memory names (4.52+ / 5.x modules): ``model.vision_tower.*``, ``model.multi_modal_projector.*``,
  ``model.language_model.*``, ``lm_head.*``.

Weights of tower layers past the deepest feature layer, ``post_layernorm`` and the
``position_ids`` buffer are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from engine.models.clip import CLIPVisionModel, resolve_feature_layers
from engine.models.layers import activation
from engine.models.llama import CausalLMTextMixin, LlamaForCausalLM, Qwen2ForCausalLM
from kernels import AttentionBackend

__all__ = ["LlavaForConditionalGeneration", "get_image_token_id", "num_image_features"]


def get_image_token_id(hf_config: Any) -> int:
    """The ``<image>`` id: ``image_token_id`` (transformers 5 alias) or ``image_token_index`` (4.x / config.json)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(hf_config, name, None)
        if value is not None:
            return int(value)
    raise ValueError("llava: config has neither image_token_id nor image_token_index")


def _strategy(hf_config: Any) -> str:
    strategy = getattr(hf_config, "vision_feature_select_strategy", "default") or "default"
    if strategy not in ("default", "full"):
        raise ValueError(f"llava: unsupported vision_feature_select_strategy {strategy!r}; expected 'default' or 'full'")
    return strategy


def num_image_features(hf_config: Any) -> int:
    """LM tokens per image: (image_size / patch_size)^2, plus the CLS token with strategy "full"."""
    v = hf_config.vision_config
    return (v.image_size // v.patch_size) ** 2 + (1 if _strategy(hf_config) == "full" else 0)


def _language_model_class(text_config: Any) -> type[LlamaForCausalLM]:
    """Our decoder for the text config: Llama / Vicuna (LLaVA-1.5), Mistral without a sliding
    window, or Qwen2 (q/k/v biases)."""
    model_type = getattr(text_config, "model_type", "llama")
    if model_type == "llama":
        return LlamaForCausalLM
    if model_type == "mistral" and getattr(text_config, "sliding_window", None) is None:
        return LlamaForCausalLM
    if model_type == "qwen2" and not getattr(text_config, "use_sliding_window", False):
        return Qwen2ForCausalLM
    raise ValueError(f"llava: language model {model_type!r} (with these settings) is not supported")


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, in_features: int, hidden: int, act: str, bias: bool) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden, bias=bias)
        self.act = activation(act)
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(CausalLMTextMixin, nn.Module):
    """LLaVA over a flattened varlen batch with 1-D positions.

    The runner embeds a prompt with images itself: ``get_input_embeddings(ids)``, the rows of the
    ``<image>`` tokens replaced by ``embed_multimodal("image", ...)`` (one item at a time), then
    ``forward(None, positions, kv_caches, meta, inputs_embeds=...)``.
    """

    uses_mrope = False
    supported_modalities = ("image",)

    def __init__(self, hf_config: Any, attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.config = hf_config
        vision, text = hf_config.vision_config, hf_config.text_config
        self.vision_config, self.text_config = vision, text
        self.image_token_id = get_image_token_id(hf_config)
        self.select_strategy = _strategy(hf_config)
        self.feature_layers = resolve_feature_layers(
            vision.num_hidden_layers, getattr(hf_config, "vision_feature_layer", -2)
        )
        self.num_image_tokens = num_image_features(hf_config)

        vision_type = getattr(vision, "model_type", "clip_vision_model")
        if vision_type != "clip_vision_model":
            raise ValueError(f"llava: vision tower {vision_type!r} is not supported; expected a CLIP vision tower")
        self.vision_tower = CLIPVisionModel(vision, num_hidden_layers=max(self.feature_layers))
        self.multi_modal_projector = LlavaMultiModalProjector(
            vision.hidden_size * len(self.feature_layers),
            text.hidden_size,
            getattr(hf_config, "projector_hidden_act", "gelu"),
            bool(getattr(hf_config, "multimodal_projector_bias", True)),
        )
        self.language_model = _language_model_class(text)(text, attn_backend)
        if bool(getattr(hf_config, "tie_word_embeddings", False)) and not self.language_model.tie_word_embeddings:
            raise ValueError("llava: tie_word_embeddings on the LLaVA config but not on its text_config is not supported")
        self.num_layers = self.language_model.num_layers
        self.num_kv_heads = self.language_model.num_kv_heads
        self.head_dim = self.language_model.head_dim

    # -- text: get_input_embeddings / forward / compute_logits come from CausalLMTextMixin --------

    def text_lm(self) -> Any:
        return self.language_model

    # -- vision -------------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, C, S, S] -> projected features [B, num_image_tokens, lm_hidden]."""
        tower = self.vision_tower
        states = tower(pixel_values.to(device=tower.device, dtype=tower.dtype), self.feature_layers)
        if self.select_strategy == "default":
            states = [s[:, 1:] for s in states]
        x = states[0] if len(states) == 1 else torch.cat(states, dim=-1)
        return self.multi_modal_projector(x)

    def embed_multimodal(self, modality: str, data: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings of every ``<image>`` token of the given images, in order: [num_tokens, hidden].

        ``pixel_values`` [n, C, S, S] (n images of ``num_image_tokens`` rows each), or
        ``image_embeds`` [rows, hidden] returned as they are.
        """
        if modality != "image":
            raise ValueError(f"llava: unsupported modality {modality!r}; expected 'image'")
        if data.get("image_embeds") is not None:
            return data["image_embeds"]
        pixels = data["pixel_values"]
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)
        return self.image_features(pixels).flatten(0, 1)

    # -- weights ------------------------------------------------------------------------------

    @staticmethod
    def _our_name(name: str) -> str:
        for old, new in (
            ("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
        ):
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if name.startswith("vision_tower.vision_model."):
            name = "vision_tower." + name[len("vision_tower.vision_model."):]
        return name

    def _skip_vision(self, name: str) -> bool:
        """Tower weights we do not build: post_layernorm, position_ids, layers past the last used one."""
        if name.startswith(("vision_tower.post_layernorm.", "vision_tower.embeddings.position_ids")):
            return True
        prefix = "vision_tower.encoder.layers."
        if name.startswith(prefix):
            index = int(name[len(prefix):].split(".", 1)[0])
            return index >= self.vision_tower.num_hidden_layers
        return False

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into our parameters; returns the names of parameters loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def lm_weights() -> Iterable[tuple[str, torch.Tensor]]:
            # One pass over the checkpoint: LM tensors stream on to the Llama loader, the rest are
            # copied here as they go by.
            for hf_name, tensor in weights:
                name = self._our_name(hf_name)
                if name.startswith("language_model."):
                    yield name[len("language_model."):], tensor
                    continue
                if self._skip_vision(name):
                    continue
                if name not in params:
                    raise ValueError(f"model: unexpected weight {hf_name!r} in checkpoint")
                if params[name].shape != tensor.shape:
                    raise ValueError(
                        f"model: weight {hf_name!r} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(params[name].shape)}"
                    )
                params[name].data.copy_(tensor)
                loaded.add(name)

        loaded |= {f"language_model.{n}" for n in self.language_model.load_weights(lm_weights())}
        return loaded
