"""A tiny random-weight Qwen2.5-VL checkpoint built locally for tests (nothing is downloaded).

Public API:

* ``build_tiny_qwen2_5_vl(out_dir, seed=0, ...)`` -> ``out_dir`` holding config.json,
  model.safetensors (written by HF's ``save_pretrained``), the same tokenizer / chat template /
  preprocessor config as ``tiny_vlm.build_tiny_qwen2_vl`` (Qwen2.5-VL uses Qwen2-VL's image
  processor) and generation_config.json.
* ``load_hf_qwen2_5_vl(model_dir)`` -> cached fp32 HF ``Qwen2_5_VLForConditionalGeneration``.

Everything else (``random_image``, ``load_image_processor``, ``image_prompt_ids``,
``video_pixel_values``) is shared with ``tiny_vlm`` and re-exported here.

Tiny model: text hidden 64, 2 layers, 4 heads / 2 kv heads (head_dim 16, mrope_section [2, 3, 3]);
vision depth 4 with full attention in blocks 1 and 3 (window attention in 0 and 2), hidden 32,
4 heads, SwiGLU intermediate 64, patch 14, spatial merge 2, temporal patch 2, window_size 56
(= 2 x 2 merged patches = 4 x 4 patches per window), out_hidden_size 64, tokens_per_second 2.
With min_pixels 56*56 an image is at least one window; a 100x150 image (grid 8 x 10, merged
4 x 5) splits into 2 x 3 windows, the last column only one merged patch wide.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tiny_vlm import (  # noqa: F401  (re-exported for the tests)
    MAX_PIXELS,
    MIN_PIXELS,
    VISION_TOKENS,
    _reinit_,
    _train_vl_tokenizer,
    image_prompt_ids,
    load_image_processor,
    random_image,
    video_pixel_values,
)
from transformers import GenerationConfig

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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _train_vl_tokenizer(out_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}

    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_position_embeddings,
            rms_norm_eps=1e-6,
            hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
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
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config.dtype = torch.float32

    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    _reinit_(model, seed)
    if tie_word_embeddings:
        model.tie_weights()
    model.eval()
    model.save_pretrained(out_dir)

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(out_dir)
    # Real Qwen2.5-VL checkpoints name Qwen2VLImageProcessor (and the v4 pixel keys) too.
    path = out_dir / "preprocessor_config.json"
    pp = json.loads(path.read_text())
    pp.update(image_processor_type="Qwen2VLImageProcessor", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    path.write_text(json.dumps(pp, indent=2) + "\n")

    GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None, do_sample=False
    ).save_pretrained(out_dir)
    return out_dir


_HF_CACHE: dict[str, torch.nn.Module] = {}


def load_hf_qwen2_5_vl(model_dir) -> torch.nn.Module:
    key = str(Path(model_dir).resolve())
    if key not in _HF_CACHE:
        m = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(key, dtype=torch.float32)
        _HF_CACHE[key] = m.eval()
    return _HF_CACHE[key]
