"""A tiny random-weight Qwen2.5-VL checkpoint built locally for tests (nothing is downloaded).

Public API:

* ``build_tiny_qwen2_5_vl(out_dir, seed=0, ...)`` -> ``out_dir`` holding config.json,
  model.safetensors (written by HF's ``save_pretrained``), the same tokenizer / chat template /
  preprocessor config as ``tiny_vlm.build_tiny_qwen2_vl`` (Qwen2.5-VL uses Qwen2-VL's image
  processor) and generation_config.json.
* ``load_hf_qwen2_5_vl(model_dir)`` -> cached fp32 HF ``Qwen2_5_VLForConditionalGeneration``.

Everything else (``random_image``, ``load_image_processor``, ``image_prompt_ids``,
``video_pixel_values``, ``make_prompt``, ``mm``, ``hf_image_embeds``, ``hf_greedy_reference``) is shared with ``tiny_vlm`` and re-exported here.

Tiny model: text hidden 64, 2 layers, 4 heads / 2 kv heads (head_dim 16, mrope_section [2, 3, 3]);
vision depth 4 with full attention in blocks 1 and 3 (window attention in 0 and 2), hidden 32,
4 heads, SwiGLU intermediate 64, patch 14, spatial merge 2, temporal patch 2, window_size 56
(= 2 x 2 merged patches = 4 x 4 patches per window), out_hidden_size 64, tokens_per_second 2.
With min_pixels 56*56 an image is at least one window; a 100x150 image (grid 8 x 10, merged
4 x 5) splits into 2 x 3 windows, the last column only one merged patch wide.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tiny_models import load_hf_cached
from tiny_vlm import (  # noqa: F401  (re-exported for the tests)
    MAX_PIXELS,
    MIN_PIXELS,
    VISION_TOKENS,
    build_qwen_vl_checkpoint,
    hf_greedy_reference,
    hf_image_embeds,
    image_prompt_ids,
    load_image_processor,
    make_prompt,
    mm,
    random_image,
    video_pixel_values,
)

WINDOW_SIZE = 56
FULLATT_BLOCK_INDEXES = [1, 3]
VISION_DEPTH = 4


def build_tiny_qwen2_5_vl(
    out_dir: Path,
    seed: int = 0,
    *,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 2048,
) -> Path:
    """Write a tiny random-weight Qwen2.5-VL checkpoint to ``out_dir``; returns ``out_dir``."""
    vision_config = dict(
        depth=VISION_DEPTH,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        hidden_act="silu",
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        window_size=WINDOW_SIZE,
        fullatt_block_indexes=list(FULLATT_BLOCK_INDEXES),
        tokens_per_second=2,
        out_hidden_size=64,
    )
    return build_qwen_vl_checkpoint(
        out_dir,
        seed,
        transformers.Qwen2_5_VLConfig,
        transformers.Qwen2_5_VLForConditionalGeneration,
        vision_config,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
    )


def load_hf_qwen2_5_vl(model_dir) -> torch.nn.Module:
    return load_hf_cached(transformers.Qwen2_5_VLForConditionalGeneration, model_dir)
