"""Model registry: HF ``architectures`` name -> our implementation, imported lazily."""

from __future__ import annotations

import importlib

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("engine.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("engine.models.llama", "Qwen2ForCausalLM"),
    "Qwen2VLForConditionalGeneration": ("engine.models.qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": ("engine.models.qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    "LlavaForConditionalGeneration": ("engine.models.llava", "LlavaForConditionalGeneration"),
    "Phi3ForCausalLM": ("engine.models.phi3", "Phi3ForCausalLM"),
    "Phi3VForCausalLM": ("engine.models.phi3v", "Phi3VForCausalLM"),
    "MiniCPMV": ("engine.models.minicpmv", "MiniCPMV"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type:
    if architecture not in _MODELS:
        raise ValueError(
            f"model: architecture {architecture!r} is not supported; supported: {supported_architectures()}"
        )
    module, cls = _MODELS[architecture]
    return getattr(importlib.import_module(module), cls)
