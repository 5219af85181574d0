"""A tiny random-weight Qwen2-VL checkpoint built locally for tests (nothing is downloaded).

Public API:

* ``build_tiny_qwen2_vl(out_dir, seed=0, ...)`` -> ``out_dir`` holding config.json, model.safetensors
  (written by HF's ``save_pretrained``), a byte-level BPE tokenizer with Qwen2-VL's special tokens
  (``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``) and Qwen2-VL's
  chat template, preprocessor_config.json (``Qwen2VLImageProcessor``, small min/max pixels) and
  generation_config.json.
* ``build_qwen_vl_checkpoint(out_dir, seed, config_cls, model_cls, vision_config, ...)`` -> the
  builder shared with ``tiny_vlm25`` (same text side, tokenizer and processor).
* ``load_hf_qwen2_vl(model_dir)`` -> cached fp32 HF ``Qwen2VLForConditionalGeneration``.
* ``load_image_processor(model_dir)`` -> the HF image processor (the PIL backend when torchvision
  is missing: ``Qwen2VLImageProcessorPil``).
* ``random_image(height, width, seed)`` -> a PIL RGB image of noise.
* ``video_pixel_values(frames, image_processor)`` -> (``pixel_values_videos``, ``video_grid_thw``)
  from a list of same-size PIL frames, laid out exactly as ``Qwen2VLVideoProcessor`` lays them
  out (that class needs torchvision, so frames are resized/normalized with the image processor and
  patchified here).
* ``image_prompt_ids(tokenizer, grids, ...)`` -> prompt token ids with one expanded placeholder run
  per image/video grid.
* ``make_prompt(num_images, text, ...)`` / ``mm(prompt, images)`` -> engine prompts with images.
* ``hf_image_embeds(hf, image_processor, image)`` -> image embeddings from HF's vision tower.
* ``hf_greedy_reference(hf, image_processor, tokenizer, max_new_tokens, video_pixels=None)`` ->
  ``get(text, images, videos)``: expected expanded prompt ids and HF's greedy continuation.

Tiny model: text hidden 64, 2 layers, 4 heads / 2 kv heads (head_dim 16, mrope_section [2, 3, 3]);
vision depth 2, embed_dim 32, 4 heads, patch 14, spatial merge 2, temporal patch 2, output 64.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import GenerationConfig

from tiny_models import load_hf_cached, reinit_weights_, train_tokenizer_with_special_tokens

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 64

# Qwen2-VL's chat template (string content, or a list of {"type": "image" | "video" | "text"} parts).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _train_vl_tokenizer(out_dir: Path):
    # <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2, then the vision tokens; declares
    # Qwen2Tokenizer, as real Qwen2-VL checkpoints do.
    return train_tokenizer_with_special_tokens(
        out_dir, "qwen2", ["<|im_start|>", "<|im_end|>", *VISION_TOKENS], QWEN2_VL_CHAT_TEMPLATE
    )


def build_qwen_vl_checkpoint(
    out_dir: Path,
    seed: int,
    config_cls: type,
    model_cls: type,
    vision_config: dict,
    *,
    tie_word_embeddings: bool,
    max_position_embeddings: int,
) -> Path:
    """Write a tiny random-weight Qwen2-VL-family checkpoint (``config_cls`` / ``model_cls`` with
    ``vision_config``; the text side, tokenizer and processor are the same for every member).

    Weights: see ``reinit_weights_``: LM weights ~ N(0, WEIGHT_STD) like tiny_models, norm scales
    ~ 1 + N(0, 0.1); vision weights use std 1/sqrt(fan_in) instead so that activations stay O(1)
    through the tower (std 0.3 on a 1176-wide patch embedding would give features in the hundreds).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _train_vl_tokenizer(out_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}

    config = config_cls(
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
        vision_config=vision_config,
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
    model = model_cls(config).to(torch.float32)
    reinit_weights_(model, seed, norm_std=0.1, fan_in_names=("visual",))
    if tie_word_embeddings:
        model.tie_weights()
    model.eval()
    model.save_pretrained(out_dir)

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Qwen2.5-VL uses Qwen2-VL's image processor too.
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(out_dir)
    # Real checkpoints also carry the v4 keys (read by transformers 4.x and by vLLM-style code).
    path = out_dir / "preprocessor_config.json"
    pp = json.loads(path.read_text())
    pp.update(image_processor_type="Qwen2VLImageProcessor", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    path.write_text(json.dumps(pp, indent=2) + "\n")

    GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None, do_sample=False
    ).save_pretrained(out_dir)
    return out_dir


def build_tiny_qwen2_vl(
    out_dir: Path,
    seed: int = 0,
    *,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 2048,
) -> Path:
    """Write a tiny random-weight Qwen2-VL checkpoint to ``out_dir``; returns ``out_dir``."""
    vision_config = dict(
        depth=2,
        embed_dim=32,
        num_heads=4,
        mlp_ratio=4,
        hidden_act="quick_gelu",
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        hidden_size=64,
    )
    return build_qwen_vl_checkpoint(
        out_dir,
        seed,
        transformers.Qwen2VLConfig,
        transformers.Qwen2VLForConditionalGeneration,
        vision_config,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
    )


# ---------------------------------------------------------------------------------------------
# HF references and inputs
# ---------------------------------------------------------------------------------------------

def load_hf_qwen2_vl(model_dir) -> torch.nn.Module:
    return load_hf_cached(transformers.Qwen2VLForConditionalGeneration, model_dir)


def load_image_processor(model_dir):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(model_dir))
    except Exception:  # pragma: no cover - depends on the installed backends
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil.from_pretrained(str(model_dir))


def random_image(height: int, width: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


def video_pixel_values(frames, image_processor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (same-size PIL images) -> (pixel_values_videos [P, C*T*p*p], video_grid_thw [[t, h, w]])."""
    per_frame = [image_processor(images=[f], return_tensors="pt") for f in frames]
    grid = per_frame[0]["image_grid_thw"][0].tolist()
    assert all(o["image_grid_thw"][0].tolist() == grid for o in per_frame), "frames must share a size"
    _, gh, gw = grid
    p = image_processor.patch_size
    m = image_processor.merge_size
    tp = image_processor.temporal_patch_size
    # Undo the image patchify to get back the normalized frame [C, H, W] (first temporal copy).
    imgs = []
    for o in per_frame:
        x = o["pixel_values"].view(gh // m, gw // m, m, m, 3, tp, p, p)[:, :, :, :, :, 0]
        imgs.append(x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p))
    video = torch.stack(imgs)  # [F, C, H, W]
    if pad := -video.shape[0] % tp:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    t = video.shape[0] // tp
    # Qwen2VLVideoProcessor.patchify
    x = video.view(t, tp, 3, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * gh * gw, 3 * tp * p * p), torch.tensor([[t, gh, gw]])


def image_prompt_ids(tokenizer, items: list[tuple[str, list[int]]], text: str = "Describe the picture.",
                     merge: int = 2) -> list[int]:
    """ChatML prompt with ``<|vision_start|>`` + pads + ``<|vision_end|>`` for each (kind, grid) item."""
    parts = ["<|im_start|>user\n"]
    for kind, (t, h, w) in items:
        pad = "<|image_pad|>" if kind == "image" else "<|video_pad|>"
        parts.append("<|vision_start|>" + pad * (t * h * w // merge**2) + "<|vision_end|>")
    parts.append(text + "<|im_end|>\n<|im_start|>assistant\n")
    return tokenizer("".join(parts)).input_ids


def make_prompt(num_images: int, text: str = "Describe this.", system: str | None = None,
                pad: str = "<|image_pad|>") -> str:
    """A ChatML prompt with ``num_images`` unexpanded ``<|vision_start|>`` + ``pad`` + ``<|vision_end|>``."""
    s = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    s += "<|im_start|>user\n" + f"<|vision_start|>{pad}<|vision_end|>" * num_images
    return s + text + "<|im_end|>\n<|im_start|>assistant\n"


def mm(prompt: str, images) -> dict:
    return {"prompt": prompt, "multi_modal_data": {"image": images}}


def hf_image_embeds(hf, image_processor, image) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_embeds [n, hidden], image_grid_thw [1, 3]) from HF's own vision tower."""
    o = image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        feats = hf.model.get_image_features(o["pixel_values"], o["image_grid_thw"])
    pooled = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    embeds = torch.cat(list(pooled)) if isinstance(pooled, (list, tuple)) else pooled
    return embeds.detach().clone(), o["image_grid_thw"]


def hf_greedy_reference(hf, image_processor, tokenizer, max_new_tokens: int, video_pixels=None):
    """``get(text, images=None, videos=None)`` -> (expected expanded prompt ids, HF greedy continuation),
    cached per text and item identities.

    Independent of the engine: each ``<|image_pad|>`` / ``<|video_pad|>`` of ``tokenizer(text)``
    becomes t*h*w/4 pads per HF's grid of the matching item (images through ``image_processor``,
    videos through ``video_pixels(video) -> (pixel_values_videos, video_grid_thw)``).
    """
    cfg = hf.config
    cache: dict = {}

    def get(text: str, images=None, videos=None) -> tuple[list[int], list[int]]:
        images, videos = list(images or []), list(videos or [])
        key = (text, tuple(map(id, images)), tuple(map(id, videos)))
        if key in cache:
            return cache[key]
        kw = {}
        img_grids, vid_grids = [], []
        if images:
            o = image_processor(images=images, return_tensors="pt")
            kw.update(pixel_values=o["pixel_values"], image_grid_thw=o["image_grid_thw"])
            img_grids = o["image_grid_thw"].tolist()
        if videos:
            pv = [video_pixels(v) for v in videos]
            kw.update(pixel_values_videos=torch.cat([p for p, _ in pv]), video_grid_thw=torch.cat([g for _, g in pv]))
            vid_grids = kw["video_grid_thw"].tolist()
        ids, gi, gv = [], iter(img_grids), iter(vid_grids)
        for t in tokenizer(text).input_ids:
            if t == cfg.image_token_id:
                ids += [t] * (math.prod(next(gi)) // 4)
            elif t == cfg.video_token_id:
                ids += [t] * (math.prod(next(gv)) // 4)
            else:
                ids.append(t)
        assert next(gi, None) is None and next(gv, None) is None
        inp = torch.tensor([ids])
        if images or videos:
            kw["mm_token_type_ids"] = (inp == cfg.image_token_id).int() + 2 * (inp == cfg.video_token_id).int()
        with torch.no_grad():
            g = hf.generate(input_ids=inp, attention_mask=torch.ones_like(inp), do_sample=False,
                            max_new_tokens=max_new_tokens, **kw)
        cache[key] = (ids, g[0, len(ids):].tolist())
        return cache[key]

    return get
