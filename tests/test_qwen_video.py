"""Qwen2-VL video input through the engine (LLM), against HF transformers.

* Pixels: the engine's ``pixel_values_videos`` / ``video_grid_thw`` equal an independent
  reference built from HF's own code — ``smart_resize`` and ``Qwen2VLVideoProcessor.patchify``
  read out of transformers' ``video_processing_qwen2_vl.py`` (that module imports torchvision,
  which is not installed, so the two functions are extracted with ``ast`` and run as they are),
  with HF's numpy ``resize`` (PIL, BICUBIC) / ``rescale`` / ``normalize`` per frame — and also
  ``tiny_vlm.video_pixel_values`` (HF's image processor per frame, re-patchified).
* Greedy outputs equal HF ``generate`` on those reference pixels token for token: a 4-frame
  video, a 5-frame video (padded to 6), video + image in one prompt, a batch mixing video and
  image prompts, ``llm.chat`` with a frames video part, precomputed embeddings dicts covering
  several images / videos.
* Input errors: limit_mm_per_prompt for videos, too many frames / pixels / tokens, placeholder
  mismatches, bad video_url chat parts (tests/test_video_url.py decodes real ones).
* Qwen2.5-VL's ``second_per_grid_ts`` (temporal_patch_size / fps) reaches the M-RoPE positions,
  which equal HF's ``Qwen2_5_VLModel.get_rope_index``.

HF's video processor resizes frames with torchvision; without torchvision the reference (and the
engine) resize with PIL, as HF's PIL image processor does. Videos are kept short in t (t <= max
merged h, w), where transformers 5's rope index and the original Qwen2-VL rule agree.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tiny_vlm
import torch

from weight_scale import build_at_scale, tiny_only
from engine import LLM, SamplingParams
from engine.mm_processors.qwen2_vl import Qwen2VLProcessor
from engine.mm_processors.qwen_video import QwenVideoConfig, QwenVideoPreprocessor

MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)


def _img(h: int, w: int, seed: int):
    return tiny_vlm.random_image(h, w, seed)


def _frames(n: int, h: int, w: int, seed: int) -> list:
    """n frames that share a noisy base and drift, so that frames differ but look alike."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(h, w, 3)).astype(np.int16)
    out = []
    for i in range(n):
        frame = np.clip(base + rng.integers(-40, 41, size=(h, w, 3)) + 10 * i, 0, 255).astype(np.uint8)
        out.append(Image.fromarray(frame, "RGB"))
    return out


# min_pixels 56*56, max_pixels 28*28*64, patch 14, merge 2 (see tiny_vlm):
VID4 = _frames(4, 100, 130, 1)  # resized to 112x140 -> grid 2x8x10 -> 40 tokens
VID5 = _frames(5, 90, 120, 2)  # 84x112, 5 frames padded to 6 -> grid 3x6x8 -> 36 tokens
VID_BIG = _frames(2, 230, 260, 3)  # over max_pixels: 196x224 -> grid 1x14x16 -> 56 tokens
IMG = _img(100, 150, 4)  # 1x8x10 -> 20 tokens
IMG2 = _img(56, 84, 5)  # 1x4x6 -> 6 tokens


def make_prompt(items: str, text: str = "What happens here?") -> str:
    """items: a string of 'i' (image) and 'v' (video) placeholders in order."""
    pads = {"i": "<|vision_start|><|image_pad|><|vision_end|>", "v": "<|vision_start|><|video_pad|><|vision_end|>"}
    return "<|im_start|>user\n" + "".join(pads[c] for c in items) + text + "<|im_end|>\n<|im_start|>assistant\n"


def mm(text: str, **data) -> dict:
    return {"prompt": text, "multi_modal_data": data}


# ---------------------------------------------------------------------------------------------
# The independent HF reference for video pixels
# ---------------------------------------------------------------------------------------------


@functools.cache
def _hf_video_code() -> SimpleNamespace:
    """``smart_resize``, ``Qwen2VLVideoProcessor.patchify`` and the class defaults, taken verbatim
    from transformers' source (the module itself needs torchvision to import)."""
    spec = importlib.util.find_spec("transformers.models.qwen2_vl.video_processing_qwen2_vl")
    tree = ast.parse(Path(spec.origin).read_text())
    wanted, defaults = [], {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "smart_resize":
            wanted.append(node)
        if isinstance(node, ast.ClassDef) and node.name == "Qwen2VLVideoProcessor":
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef) and sub.name == "patchify":
                    wanted.append(sub)
                if isinstance(sub, ast.Assign) and isinstance(sub.targets[0], ast.Name):
                    try:  # constants such as size = {"shortest_edge": 128 * 28 * 28, ...}
                        expr = compile(ast.Expression(sub.value), spec.origin, "eval")
                        defaults[sub.targets[0].id] = eval(expr, {"__builtins__": {}})
                    except NameError:
                        continue  # names from imports (CLIP mean/std, resampling enums)
    assert [f.name for f in wanted] == ["smart_resize", "patchify"]
    ns: dict = {"math": math, "torch": torch}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), spec.origin, "exec"), ns)
    return SimpleNamespace(smart_resize=ns["smart_resize"], patchify=functools.partial(ns["patchify"], None),
                           defaults=defaults)


def hf_video_pixels(frames, model_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """What Qwen2VLVideoProcessor returns for these frames (PIL resize instead of torchvision)."""
    from transformers.image_transforms import normalize, rescale, resize
    from transformers.image_utils import (
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
        ChannelDimension,
        PILImageResampling,
    )

    hf = _hf_video_code()
    d = hf.defaults
    pp = json.loads((model_dir / "preprocessor_config.json").read_text())  # the video processor falls back to it
    min_pixels = pp.get("min_pixels", d["size"]["shortest_edge"])
    max_pixels = pp.get("max_pixels", d["size"]["longest_edge"])
    patch, merge, tp = d["patch_size"], d["merge_size"], d["temporal_patch_size"]
    width, height = frames[0].size
    rh, rw = hf.smart_resize(height, width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    out = []
    for f in frames:
        x = resize(np.array(f.convert("RGB")), (rh, rw), resample=PILImageResampling.BICUBIC,
                   input_data_format=ChannelDimension.LAST)
        x = rescale(x, 1 / 255, input_data_format=ChannelDimension.LAST)
        x = normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, input_data_format=ChannelDimension.LAST)
        out.append(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))))
    videos = torch.stack(out)[None]  # [1, T, C, H, W]
    patches, t, h, w = hf.patchify(videos, patch_size=patch, merge_size=merge, temporal_patch_size=tp)
    return patches[0], torch.tensor([[t, h, w]])


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, scale):
    # video equality runs at both weight scales (weight_scale); pixel, limit and error checks at
    # the tiny one (tiny_only)
    return build_at_scale(tiny_vlm.build_tiny_qwen2_vl, tmp_path_factory.mktemp(f"tiny_qwen2_vl_video_{scale}"),
                          scale, seed=0)


@pytest.fixture(scope="module")
def hf(vlm_dir):
    return tiny_vlm.load_hf_qwen2_vl(vlm_dir)


@pytest.fixture(scope="module")
def image_processor(vlm_dir):
    return tiny_vlm.load_image_processor(vlm_dir)


@pytest.fixture(scope="module")
def llm(vlm_dir):
    return LLM(str(vlm_dir), dtype="float32", device="cpu", max_model_len=512, max_num_seqs=8)


@pytest.fixture(scope="module")
def ref(hf, image_processor, vlm_dir, llm):
    """ref(text, images, videos) -> (expected expanded prompt ids, HF greedy continuation)."""
    return tiny_vlm.hf_greedy_reference(
        hf, image_processor, llm.get_tokenizer(), MAX_TOKENS, video_pixels=lambda v: hf_video_pixels(v, vlm_dir)
    )


def assert_matches(out, ref, text, images=(), videos=()) -> None:
    ids, expected = ref(text, images, videos)
    assert out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == expected
    assert len(expected) > 0


def assert_nothing_queued(llm) -> None:
    assert not llm.core.scheduler.waiting and not llm.core.scheduler.running
    assert not llm.core.has_unfinished()
    assert not llm.output_processor.requests


def hf_embeds(hf, pixels, grid, modality: str) -> torch.Tensor:
    with torch.no_grad():
        fn = hf.model.get_video_features if modality == "video" else hf.model.get_image_features
        feats = fn(pixels, grid)
    pooled = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    return (torch.cat(list(pooled)) if isinstance(pooled, (list, tuple)) else pooled).detach().clone()


# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------


@tiny_only
def test_video_pixels_match_hf_reference(llm, vlm_dir, image_processor):
    proc = llm.processor.mm_processor
    vp = proc.video_processor
    pp = json.loads((vlm_dir / "preprocessor_config.json").read_text())
    assert (vp.config.min_pixels, vp.config.max_pixels) == (pp["min_pixels"], pp["max_pixels"])
    cases = [(VID4, [2, 8, 10]), (VID5, [3, 6, 8]), (VID_BIG, [1, 14, 16]), (VID4[:1], [1, 8, 10])]
    for frames, grid in cases:
        got, got_grid = vp(frames)
        want, want_grid = hf_video_pixels(frames, vlm_dir)
        assert got_grid.tolist() == want_grid.tolist() == [grid]
        assert got.shape == want.shape == (math.prod(grid), 3 * 2 * 14 * 14)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        # A second independent path: HF's image processor per frame, re-patchified.
        alt, alt_grid = tiny_vlm.video_pixel_values(frames, image_processor)
        assert alt_grid.tolist() == [grid]
        torch.testing.assert_close(got, alt, rtol=0, atol=1e-6)
    # The same video as a (T, H, W, 3) uint8 array, a tensor, or a list of (H, W, 3) arrays.
    arr = np.stack([np.asarray(f) for f in VID5])
    base, _ = vp(VID5)
    for form in (arr, torch.from_numpy(arr), list(arr)):
        assert torch.equal(vp(form)[0], base)


def test_video_config_lookup_order(tmp_path):
    """processor_config.json['video_processor'] > video_preprocessor_config.json > preprocessor_config.json."""
    assert QwenVideoConfig.from_model_dir(tmp_path) == QwenVideoConfig()  # HF's class defaults
    assert (QwenVideoConfig().min_pixels, QwenVideoConfig().max_pixels) == (128 * 28 * 28, 28 * 28 * 768)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 100, "longest_edge": 5000}}))
    c = QwenVideoConfig.from_model_dir(tmp_path)
    assert (c.min_pixels, c.max_pixels) == (100, 5000)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"min_pixels": 200, "max_pixels": 6000}))
    c = QwenVideoConfig.from_model_dir(tmp_path)
    assert (c.min_pixels, c.max_pixels) == (200, 6000)
    (tmp_path / "processor_config.json").write_text(json.dumps({"video_processor": {"size": {"shortest_edge": 300, "longest_edge": 7000}}}))
    c = QwenVideoConfig.from_model_dir(tmp_path)
    assert (c.min_pixels, c.max_pixels) == (300, 7000)
    with pytest.raises(ValueError, match="temporal_patch_size"):
        QwenVideoConfig(temporal_patch_size=1).check_against(SimpleNamespace(patch_size=14, temporal_patch_size=2, spatial_merge_size=2))


# ---------------------------------------------------------------------------------------------
# Equality with HF generate
# ---------------------------------------------------------------------------------------------


def test_four_frame_video_equals_hf(llm, ref):
    text = make_prompt("v")
    out = llm.generate(mm(text, video=VID4), GREEDY, use_tqdm=False)[0]
    assert_matches(out, ref, text, videos=[VID4])
    assert out.prompt_token_ids.count(llm.config.model.hf_config.video_token_id) == 40
    # Same request as token ids, with one placeholder or with the run already expanded.
    ids, expected = ref(text, videos=[VID4])
    tok = llm.get_tokenizer()
    outs = llm.generate([{"prompt_token_ids": tok(text).input_ids, "multi_modal_data": {"video": [VID4]}},
                         {"prompt_token_ids": ids, "multi_modal_data": {"video": VID4}}], GREEDY, use_tqdm=False)
    for o in outs:
        assert o.prompt_token_ids == ids and o.outputs[0].token_ids == expected


@tiny_only
def test_five_frame_video_padded_equals_hf(llm, ref):
    text = make_prompt("v", "Describe the motion.")
    arr = np.stack([np.asarray(f) for f in VID5])
    outs = llm.generate([mm(text, video=VID5), mm(text, video=arr)], GREEDY, use_tqdm=False)
    for out in outs:
        assert_matches(out, ref, text, videos=[VID5])
    assert outs[0].prompt_token_ids.count(llm.config.model.hf_config.video_token_id) == 36


def test_video_and_image_in_one_prompt_equal_hf(llm, ref):
    # Video before the image: the image's offset moves when the video run is expanded.
    t1 = make_prompt("vi", "Compare the clip and the picture.")
    t2 = make_prompt("ivi", "Two pictures around a clip.")
    outs = llm.generate([mm(t1, video=VID4, image=IMG), mm(t2, video=[VID5], image=[IMG2, IMG])], GREEDY,
                        use_tqdm=False)
    assert_matches(outs[0], ref, t1, images=[IMG], videos=[VID4])
    assert_matches(outs[1], ref, t2, images=[IMG2, IMG], videos=[VID5])
    cfg = llm.config.model.hf_config
    ids = outs[0].prompt_token_ids
    assert ids.index(cfg.image_token_id) > ids.index(cfg.video_token_id) + 40


def test_mixed_batch_equals_hf(llm, ref):
    t_vid = make_prompt("v", "Batch: the clip?")
    t_img = make_prompt("i", "Batch: the picture?")
    t_text = make_prompt("", "Batch: count to five.")
    t_both = make_prompt("iv", "Batch: both?")
    t_two = make_prompt("vv", "Batch: two clips.")
    cases = [
        (t_vid, [], [VID5]),
        (t_img, [IMG], []),
        (t_text, [], []),
        (t_both, [IMG2], [VID_BIG]),
        (t_two, [], [VID4, VID5]),
        (t_vid, [], [VID4]),
    ]
    prompts = [mm(t, **({"image": i} if i else {}), **({"video": v} if v else {})) if (i or v) else t
               for t, i, v in cases]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for out, (t, i, v) in zip(outs, cases):
        assert_matches(out, ref, t, images=i, videos=v)


@tiny_only
def test_same_video_twice_hits_caches(llm, ref):
    frames = _frames(4, 100, 130, 7)
    text = make_prompt("v", "A clip seen twice. " * 4)
    first = llm.generate(mm(text, video=frames), GREEDY, use_tqdm=False)[0]
    second = llm.generate(mm(text, video=frames), GREEDY, use_tqdm=False)[0]
    assert second.num_cached_tokens > 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert_matches(second, ref, text, videos=[frames])
    # Other frames, same size: identical token ids, no KV blocks holding video tokens shared.
    other = _frames(4, 100, 130, 8)
    third = llm.generate(mm(text, video=other), GREEDY, use_tqdm=False)[0]
    assert third.prompt_token_ids == first.prompt_token_ids
    start = third.prompt_token_ids.index(llm.config.model.hf_config.video_token_id)
    assert third.num_cached_tokens <= start
    assert_matches(third, ref, text, videos=[other])


@tiny_only
def test_chat_with_video_frames_part(llm, ref):
    messages = [{"role": "user", "content": [
        {"type": "video", "video": VID4},
        {"type": "text", "text": "What happens in this video?"},
    ]}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    prompt = llm.processor.chat_prompt(messages, llm.media_loader)
    assert "<|vision_start|><|video_pad|><|vision_end|>What happens in this video?" in prompt["prompt"]
    assert len(prompt["multi_modal_data"]["video"]) == 1
    assert_matches(out, ref, prompt["prompt"], videos=[VID4])
    # Image and video parts in one message, and the (T, H, W, 3) array form.
    arr = np.stack([np.asarray(f) for f in VID5])
    messages = [{"role": "user", "content": [
        {"type": "image", "image": IMG2},
        {"type": "text", "text": "and then"},
        {"type": "video", "video": arr},
    ]}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    prompt = llm.processor.chat_prompt(messages, llm.media_loader)
    assert prompt["prompt"].index("<|image_pad|>") < prompt["prompt"].index("<|video_pad|>")
    assert_matches(out, ref, prompt["prompt"], images=[IMG2], videos=[VID5])


@tiny_only
def test_chat_template_without_video_support_inlines_placeholder(llm, ref):
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] if m['content'] is string "
                "else '' }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    messages = [{"role": "user", "content": [{"type": "video", "video": VID4}, {"type": "text", "text": "Hi"}]}]
    prompt = llm.processor.chat_prompt(messages, llm.media_loader, chat_template=template)
    assert "<|vision_start|><|video_pad|><|vision_end|>\nHi" in prompt["prompt"]
    out = llm.chat(messages, GREEDY, chat_template=template, use_tqdm=False)[0]
    assert_matches(out, ref, prompt["prompt"], videos=[VID4])


@tiny_only
def test_chat_rejects_video_urls_and_bad_parts(llm):
    for part, match in [
        # not a video (decoded with PyAV where installed, else refused saying what to send instead)
        ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, r"content\[0\]\.video_url"),
        ({"type": "video", "video": "clip.mp4"}, r"content\[0\]\.video"),
        ({"type": "video", "video": []}, r"content\[0\]\.video"),
    ]:
        with pytest.raises(ValueError, match=match):
            llm.chat([{"role": "user", "content": [part, {"type": "text", "text": "?"}]}], GREEDY, use_tqdm=False)
    assert_nothing_queued(llm)


# ---------------------------------------------------------------------------------------------
# Precomputed embeddings
# ---------------------------------------------------------------------------------------------


@tiny_only
def test_multi_image_embeds_dict_counts_as_n_images(llm, ref, hf, image_processor, vlm_dir):
    o = image_processor(images=[IMG, IMG2], return_tensors="pt")
    embeds = hf_embeds(hf, o["pixel_values"], o["image_grid_thw"], "image")
    assert embeds.shape == (20 + 6, 64)
    text = make_prompt("ii", "Two pictures.")
    outs = llm.generate([mm(text, image=[IMG, IMG2]),
                         mm(text, image={"image_embeds": embeds, "image_grid_thw": o["image_grid_thw"]})],
                        GREEDY, use_tqdm=False)
    assert_matches(outs[0], ref, text, images=[IMG, IMG2])
    assert outs[1].prompt_token_ids == outs[0].prompt_token_ids
    assert outs[1].outputs[0].token_ids == outs[0].outputs[0].token_ids
    # Two images around a video, the images given as one embeddings dict.
    t2 = make_prompt("ivi", "Embeds and a clip.")
    out = llm.generate(mm(t2, image={"image_embeds": embeds, "image_grid_thw": o["image_grid_thw"]}, video=VID5),
                       GREEDY, use_tqdm=False)[0]
    assert_matches(out, ref, t2, images=[IMG, IMG2], videos=[VID5])
    # Videos as one embeddings dict too.
    pv = [hf_video_pixels(v, vlm_dir) for v in (VID4, VID5)]
    vgrid = torch.cat([g for _, g in pv])
    vemb = hf_embeds(hf, torch.cat([p for p, _ in pv]), vgrid, "video")
    t3 = make_prompt("vv", "Two clips, precomputed.")
    out = llm.generate(mm(t3, video={"video_embeds": vemb, "video_grid_thw": vgrid}), GREEDY, use_tqdm=False)[0]
    assert_matches(out, ref, t3, videos=[VID4, VID5])
    # Errors: rows that do not match the grids; the wrong hidden size.
    with pytest.raises(ValueError, match="image_embeds has 25 rows"):
        llm.generate(mm(text, image={"image_embeds": embeds[:-1], "image_grid_thw": o["image_grid_thw"]}), GREEDY,
                     use_tqdm=False)
    with pytest.raises(ValueError, match="hidden size"):
        llm.generate(mm(t3, video={"video_embeds": vemb[:, :32], "video_grid_thw": vgrid}), GREEDY, use_tqdm=False)
    assert_nothing_queued(llm)


# ---------------------------------------------------------------------------------------------
# Limits and errors
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_llm(vlm_dir):
    return LLM(str(vlm_dir), dtype="float32", device="cpu", max_model_len=256, max_num_seqs=4,
               limit_mm_per_prompt={"video": 1, "image": 1})


@tiny_only
def test_limit_mm_per_prompt_video(limited_llm, ref, hf, image_processor):
    llm = limited_llm
    with pytest.raises(ValueError, match=r"2 video items exceed limit_mm_per_prompt\['video'\]=1"):
        llm.generate([mm(make_prompt("v"), video=VID4), mm(make_prompt("vv"), video=[VID4, VID5])], GREEDY,
                     use_tqdm=False)
    # An embeddings dict covering two images is two images.
    o = image_processor(images=[IMG, IMG2], return_tensors="pt")
    embeds = hf_embeds(hf, o["pixel_values"], o["image_grid_thw"], "image")
    with pytest.raises(ValueError, match=r"2 image items exceed limit_mm_per_prompt\['image'\]=1"):
        llm.generate(mm(make_prompt("ii"), image={"image_embeds": embeds, "image_grid_thw": o["image_grid_thw"]}),
                     GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="limit_mm_per_prompt"):
        llm.chat([{"role": "user", "content": [{"type": "video", "video": VID4}, {"type": "video", "video": VID5}]}],
                 GREEDY, use_tqdm=False)
    assert_nothing_queued(llm)
    text = make_prompt("v")
    out = llm.generate(mm(text, video=VID4), GREEDY, use_tqdm=False)[0]  # one is fine
    assert_matches(out, ref, text, videos=[VID4])


@tiny_only
def test_video_bounds_raise_value_error_naming_the_field(llm):
    proc = llm.processor.mm_processor
    assert proc.max_video_frames == 256
    text = make_prompt("v")
    # 257 frames: refused from the shape alone (the broadcast array is never copied).
    too_long = np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (257, 1080, 1920, 3))
    with pytest.raises(ValueError, match=r"multi_modal_data: video 0: 257 frames exceed .*256.*max_video_frames"):
        llm.generate(mm(text, video=too_long), GREEDY, use_tqdm=False)
    small = [_img(8, 8, i) for i in range(257)]
    with pytest.raises(ValueError, match="max_video_frames"):
        llm.generate(mm(text, video=small), GREEDY, use_tqdm=False)
    huge = np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (200, 2160, 3840, 3))
    with pytest.raises(ValueError, match=r"video 0: .*max_video_pixels"):
        llm.generate(mm(text, video=huge), GREEDY, use_tqdm=False)
    # More tokens than max_model_len (512): 200 frames at 20 tokens per 2 frames.
    long_clip = np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (200, 112, 140, 3))
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(mm(text, video=long_clip), GREEDY, use_tqdm=False)
    # The bounds are arguments of the processor.
    strict = Qwen2VLProcessor(llm.config, llm.get_tokenizer(), max_video_frames=3, max_video_pixels=10**9)
    with pytest.raises(ValueError, match="4 frames exceed the limit of 3"):
        strict.process(llm.get_tokenizer()(text).input_ids, strict.normalize({"video": VID4}))
    assert QwenVideoPreprocessor(QwenVideoConfig(), max_frames=4, max_total_pixels=100).max_total_pixels == 100
    # Malformed videos.
    for bad, match in [
        ([VID4[0], _img(50, 50, 9)], "same size"),
        (np.zeros((2, 10, 10), np.uint8), r"shape \(T, H, W, 3\)"),
        ([np.zeros((10, 10, 3), np.float32)], "uint8"),
        ({"frames": VID4, "fps": 0}, "fps"),
        ({"clip": VID4}, "'frames'"),
        ("clip.mp4", "list of PIL images"),
    ]:
        with pytest.raises(ValueError, match=match):
            llm.generate(mm(text, video=bad), GREEDY, use_tqdm=False)
    assert_nothing_queued(llm)


@tiny_only
def test_video_placeholder_mismatch_raises(llm):
    for prompt in [mm(make_prompt("vv"), video=VID4), mm(make_prompt("v"), video=[VID4, VID5]),
                   mm(make_prompt("i"), video=VID4, image=IMG), make_prompt("v")]:
        with pytest.raises(ValueError, match="placeholder"):
            llm.generate(prompt, GREEDY, use_tqdm=False)
    assert_nothing_queued(llm)


# ---------------------------------------------------------------------------------------------
# Qwen2.5-VL: second_per_grid_ts in the positions
# ---------------------------------------------------------------------------------------------


@tiny_only
def test_qwen2_5_second_per_grid_ts_positions_match_hf(llm, hf):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    tok = llm.get_tokenizer()
    hf_cfg = copy.deepcopy(hf.config)
    hf_cfg.vision_config.tokens_per_second = 2  # as Qwen2.5-VL checkpoints
    config = dataclasses.replace(llm.config, model=dataclasses.replace(llm.config.model, hf_config=hf_cfg))
    proc = Qwen2VLProcessor(config, tok)
    hf25 = SimpleNamespace(config=hf_cfg)
    hf25.get_vision_position_ids = functools.partial(Qwen2_5_VLModel.get_vision_position_ids, hf25)
    text = make_prompt("viv", "When does it change?")
    for videos, fps in [([VID4, VID4], [2.0, 2.0]), ([{"frames": VID4, "fps": 1.0}, {"frames": VID4, "fps": 4.0}], [1.0, 4.0])]:
        p = proc.process(tok(text).input_ids, proc.normalize({"video": videos, "image": IMG2}))
        ids = torch.tensor([p.prompt_token_ids])
        types = (ids == hf_cfg.image_token_id).int() + 2 * (ids == hf_cfg.video_token_id).int()
        want, delta = Qwen2_5_VLModel.get_rope_index(
            hf25, ids, types, image_grid_thw=torch.tensor([[1, 4, 6]]), video_grid_thw=torch.tensor([[2, 8, 10]] * 2),
            second_per_grid_ts=torch.tensor([2 / f for f in fps]))
        assert torch.equal(p.mrope_positions, want[:, 0]), fps
        assert p.mrope_delta == int(delta)
    # fps changes the positions, so it joins the content hash (prefix-cache and encoder-cache key).
    a = proc.process(tok(make_prompt("v")).input_ids, proc.normalize({"video": {"frames": VID4, "fps": 1.0}}))
    b = proc.process(tok(make_prompt("v")).input_ids, proc.normalize({"video": VID4}))
    assert a.mm_features[0].identifier != b.mm_features[0].identifier
    assert not torch.equal(a.mrope_positions, b.mrope_positions)
    # Qwen2-VL (no tokens_per_second) ignores fps.
    plain = llm.processor.mm_processor
    a = plain.process(tok(make_prompt("v")).input_ids, plain.normalize({"video": {"frames": VID4, "fps": 1.0}}))
    b = plain.process(tok(make_prompt("v")).input_ids, plain.normalize({"video": VID4}))
    assert torch.equal(a.mrope_positions, b.mrope_positions)


def test_qwen2_5_video_equals_hf_generate(tmp_path_factory, scale):
    """End to end on a tiny Qwen2.5-VL: the default fps (2.0) and an item's own fps reach HF's
    ``second_per_grid_ts`` and our positions alike."""
    tiny_vlm25 = pytest.importorskip("tiny_vlm25")
    model_dir = build_at_scale(tiny_vlm25.build_tiny_qwen2_5_vl,
                               tmp_path_factory.mktemp(f"tiny_qwen2_5_vl_video_{scale}"), scale, seed=0)
    hf25 = tiny_vlm25.load_hf_qwen2_5_vl(model_dir)
    cfg = hf25.config
    assert cfg.vision_config.tokens_per_second == 2
    llm25 = LLM(str(model_dir), dtype="float32", device="cpu", max_model_len=512, max_num_seqs=4)
    tok = llm25.get_tokenizer()
    text = make_prompt("iv", "Qwen2.5: when does it change?")
    image_processor = tiny_vlm.load_image_processor(model_dir)
    o = image_processor(images=[IMG2], return_tensors="pt")
    pixels, grid = hf_video_pixels(VID4, model_dir)
    cases = [(VID4, 2.0), ({"frames": VID4, "fps": 1.0}, 1.0), ({"frames": VID4, "fps": 4.0}, 4.0)]
    outs = llm25.generate([mm(text, image=IMG2, video=v) for v, _ in cases], GREEDY, use_tqdm=False)
    results = []
    for out, (_, fps) in zip(outs, cases):
        ids = []
        for t in tok(text).input_ids:
            n = {cfg.image_token_id: 6, cfg.video_token_id: 40}.get(t, 1)
            ids += [t] * n
        inp = torch.tensor([ids])
        types = (inp == cfg.image_token_id).int() + 2 * (inp == cfg.video_token_id).int()
        with torch.no_grad():
            g = hf25.generate(input_ids=inp, attention_mask=torch.ones_like(inp), do_sample=False,
                              max_new_tokens=MAX_TOKENS, pixel_values=o["pixel_values"],
                              image_grid_thw=o["image_grid_thw"], pixel_values_videos=pixels, video_grid_thw=grid,
                              second_per_grid_ts=torch.tensor([2 / fps]), mm_token_type_ids=types)
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == g[0, len(ids):].tolist(), fps
        results.append(out.outputs[0].token_ids)
    assert len(results[0]) > 0
