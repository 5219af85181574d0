"""A tiny random-weight LLaVA-1.5 checkpoint built locally for tests (nothing is downloaded).

Public API:

* ``build_tiny_llava(out_dir, seed=0, ...)`` -> ``out_dir`` holding config.json (``LlavaConfig``:
  CLIP vision tower + Llama text config), model.safetensors (written by HF's ``save_pretrained``),
  the tiny byte-level Llama tokenizer plus an ``<image>`` special token, a LLaVA-1.5-style chat
  template, preprocessor_config.json (``CLIPImageProcessor``; shortest edge / center crop = the
  tower's image size) and generation_config.json.
* ``load_hf_llava(model_dir)`` -> cached fp32 HF ``LlavaForConditionalGeneration``.
* ``load_image_processor(model_dir)`` -> the HF image processor (``CLIPImageProcessorPil`` when
  torchvision is missing).
* ``num_image_tokens(config)`` -> LM placeholder tokens per image: (image_size / patch)^2, + 1 when
  ``vision_feature_select_strategy == "full"``.
* ``expand_image_tokens(ids, image_token_id, n)`` -> ids with every ``<image>`` repeated ``n`` times
  (what HF's ``LlavaProcessor`` does to the text before tokenizing).
* ``random_image(height, width, seed)`` -> a PIL RGB image of noise.

Tiny model: CLIP vision hidden 32, 2 layers, 4 heads, patch 14, image 56 (16 patches, + CLS);
Llama text hidden 64, 2 layers, 4 heads / 2 kv heads; projector 32 -> 64 -> 64 (GELU).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig

from tiny_models import load_hf_cached, reinit_weights_, train_tokenizer_with_special_tokens
from tiny_vlm import random_image  # noqa: F401  (re-exported for the tests)

IMAGE_TOKEN = "<image>"

# LLaVA-1.5 (llava-hf) style: "<s>[system ]USER: <image>\n<text> ASSISTANT:"; string content or a
# list of {"type": "image"} / {"type": "text", "text"} parts (images first, as llava-hf's template
# does). The template writes the bos itself, so a rendered prompt is encoded without special tokens.
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\n' }}{% endif %}"
    "{% endfor %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'text' %}{{ content['text'] + ' ' }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _train_llava_tokenizer(out_dir: Path):
    # <unk> 0, <s> 1 (bos), </s> 2 (eos), then <image>
    return train_tokenizer_with_special_tokens(out_dir, "llama", [IMAGE_TOKEN], LLAVA_CHAT_TEMPLATE)


def build_tiny_llava(
    out_dir: Path,
    seed: int = 0,
    *,
    image_size: int = 56,
    vision_feature_select_strategy: str = "default",
    vision_feature_layer: int | list[int] = -2,
    num_vision_layers: int = 2,
    max_position_embeddings: int = 1024,
) -> Path:
    """Write a tiny random-weight LLaVA-1.5 checkpoint to ``out_dir``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _train_llava_tokenizer(out_dir)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    patch = 14

    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=32,
    )
    text = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    features = (image_size // patch) ** 2 + (1 if vision_feature_select_strategy == "full" else 0)
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=features,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=vision_feature_select_strategy,
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=False,
    )
    config.dtype = torch.float32

    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).to(torch.float32)
    # LM weights ~ N(0, WEIGHT_STD) like tiny_models, norm scales ~ 1 + N(0, 0.1); vision tower and
    # projector weights use std 1/sqrt(fan_in) so activations stay O(1); the CLS embedding is N(0, 1).
    reinit_weights_(
        model,
        seed,
        norm_std=0.1,
        fan_in_names=("vision_tower", "multi_modal_projector"),
        unit_names=("class_embedding",),
    )
    model.eval()
    model.save_pretrained(out_dir)

    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(out_dir)
    # Real checkpoints name the (v4) class; v5 maps it to the PIL backend without torchvision.
    path = out_dir / "preprocessor_config.json"
    pp = json.loads(path.read_text())
    pp["image_processor_type"] = "CLIPImageProcessor"
    path.write_text(json.dumps(pp, indent=2) + "\n")

    GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, do_sample=False
    ).save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# HF references and inputs
# ---------------------------------------------------------------------------------------------

def load_hf_llava(model_dir) -> torch.nn.Module:
    return load_hf_cached(transformers.LlavaForConditionalGeneration, model_dir)


def load_image_processor(model_dir):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(model_dir))


def num_image_tokens(config) -> int:
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2 + (1 if config.vision_feature_select_strategy == "full" else 0)


def expand_image_tokens(ids: list[int], image_token_id: int, n: int) -> list[int]:
    out: list[int] = []
    for t in ids:
        out.extend([t] * n if t == image_token_id else [t])
    return out
