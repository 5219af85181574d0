"""Our Qwen2.5-VL (engine/models/qwen2_5_vl.py) against HF transformers on a tiny random checkpoint.

Component level: the window partition (HF's ``get_vision_window_index``), the vision tower with
window attention (one image, three images of different sizes in one call, a video; grids that
are and are not multiples of the window), M-RoPE positions (HF's Qwen2.5-VL ``get_rope_index``,
incl. ``second_per_grid_ts`` / ``tokens_per_second`` for videos) and weight loading in both
layouts. Engine level: greedy ``LLM.generate`` token for token equal to HF ``generate`` for text
only, one image, three mixed-size images, a batch, chunked prefill through image tokens and
precomputed ``image_embeds``. All fp32 on CPU.

The tiny tower has window_size 56 / patch 14 / merge 2 (windows of 2 x 2 merged patches) and
full attention in blocks 1 and 3 only, so both attention kinds and the padding of partial
windows run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_vlm25
import torch
import transformers
from tiny_vlm25 import hf_image_embeds, make_prompt, mm
from weight_scale import build_at_scale, tiny_only

from engine import LLM, SamplingParams
from engine.loader import iterate_weights
from engine.models import get_model_class
from engine.models.qwen2_5_vl import (
    Qwen2_5_VLForConditionalGeneration,
    get_window_index,
)
from engine.models.qwen2_vl import get_mrope_positions, num_mm_tokens
from kernels import get_backend

MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
ATOL = 1e-4

# Grids (t, h, w) with min_pixels 56*56, max_pixels 28*28*64, merge 2 -> merged grid, LM tokens:
IMG_A = tiny_vlm25.random_image(100, 150, 1)  # 1x8x10 -> 4x5 merged (w not a window multiple), 20
IMG_SMALL = tiny_vlm25.random_image(56, 56, 2)  # 1x4x4 -> 2x2: exactly one window, 4
IMG_WIDE = tiny_vlm25.random_image(60, 300, 3)  # 1x4x22 -> 2x11, 22
IMG_ODD = tiny_vlm25.random_image(90, 200, 5)  # 1x6x14 -> 3x7 (neither a multiple), 21
IMG_BIG = tiny_vlm25.random_image(200, 250, 4)  # 1x14x18 -> 7x9, 63


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, scale) -> Path:
    # engine equality runs at both weight scales (weight_scale); the component tests at the tiny
    # one (the towers' bit-exactness at both: tests/test_vision_exactness.py)
    return build_at_scale(tiny_vlm25.build_tiny_qwen2_5_vl, tmp_path_factory.mktemp(f"tiny_qwen2_5_vl_{scale}"),
                          scale, seed=0)


@pytest.fixture(scope="module")
def hf(vlm_dir):
    return tiny_vlm25.load_hf_qwen2_5_vl(vlm_dir)


@pytest.fixture(scope="module")
def processor(vlm_dir):
    return tiny_vlm25.load_image_processor(vlm_dir)


@pytest.fixture(scope="module")
def ours(vlm_dir, hf):
    model = Qwen2_5_VLForConditionalGeneration(hf.config, get_backend("cpu")).eval()
    loaded = model.load_weights(iterate_weights(vlm_dir))
    assert loaded == {n for n, _ in model.named_parameters()}
    return model


def _token_types(ids: torch.Tensor, config) -> torch.Tensor:
    return (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()


@torch.no_grad()
def _hf_features(hf, pixel_values, grid) -> torch.Tensor:
    return torch.cat(hf.model.get_image_features(pixel_values, grid).pooler_output)


# ---------------------------------------------------------------------------------------------
# Checkpoint, registry, weights
# ---------------------------------------------------------------------------------------------


@tiny_only
def test_registry_checkpoint_names_and_in_memory_layout(vlm_dir, hf, ours):
    from engine.mm_processor import _PROCESSORS

    assert get_model_class("Qwen2_5_VLForConditionalGeneration") is Qwen2_5_VLForConditionalGeneration
    assert _PROCESSORS["Qwen2_5_VLForConditionalGeneration"][1] == "Qwen2VLProcessor"
    assert ours.uses_mrope is True and (ours.num_layers, ours.num_kv_heads, ours.head_dim) == (2, 2, 16)
    vc = hf.config.vision_config
    assert (vc.window_size, list(vc.fullatt_block_indexes), vc.depth) == (56, [1, 3], 4)
    # transformers 5.24's save_pretrained writes the original layout ...
    saved = {n for n, _ in iterate_weights(vlm_dir)}
    for name in ("visual.blocks.0.mlp.gate_proj.bias", "visual.blocks.0.norm1.weight", "visual.merger.ln_q.weight",
                 "model.layers.0.self_attn.q_proj.bias", "model.embed_tokens.weight", "lm_head.weight"):
        assert name in saved, name
    assert not any(n.startswith(("model.visual.", "model.language_model.")) for n in saved)
    assert not any("ln_q.bias" in n or "norm1.bias" in n for n in saved)  # RMSNorm: no biases
    # ... while its in-memory names are model.visual.* / model.language_model.*: both load the same.
    mem = hf.state_dict()
    assert any(n.startswith("model.visual.") for n in mem) and any(n.startswith("model.language_model.") for n in mem)
    other = Qwen2_5_VLForConditionalGeneration(hf.config, get_backend("cpu"))
    assert other.load_weights(mem.items()) == {n for n, _ in other.named_parameters()}
    ref = dict(ours.named_parameters())
    for n, p in other.named_parameters():
        assert torch.equal(p, ref[n]), n
    with pytest.raises(ValueError, match="unexpected weight"):
        other.load_weights([("visual.blocks.0.mlp.fc1.weight", torch.zeros(1))])


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grids",
    [[[1, 8, 10]], [[1, 4, 4]], [[1, 8, 8]], [[1, 14, 18], [1, 4, 22], [1, 6, 14]], [[3, 6, 10], [1, 4, 4], [2, 8, 8]]],
)
def test_window_index_matches_hf(grids):
    from transformers.vision_utils import get_vision_window_index

    index, lengths = get_window_index(grids, 2, 56, 14)
    ref_index, ref_cu = get_vision_window_index(torch.tensor(grids), 2, 56, 14)
    assert torch.equal(index, ref_index)
    assert lengths == torch.diff(ref_cu).tolist()
    assert sum(lengths) == sum(t * h * w for t, h, w in grids)


@tiny_only
@torch.no_grad()
def test_vision_single_image(ours, hf, processor):
    inputs = processor(images=[IMG_A], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 10]]
    _, lengths = get_window_index(inputs["image_grid_thw"].tolist(), 2, 56, 14)
    assert lengths == [16, 16, 8, 16, 16, 8]  # 2 x 3 windows, the last column half wide
    ref = _hf_features(hf, inputs["pixel_values"], inputs["image_grid_thw"])
    got = ours.embed_multimodal("image", dict(inputs))
    assert got.shape == (20, 64)
    err = (got - ref).abs().max().item()
    print(f"single image max abs err {err:.3e} (feature max {ref.abs().max():.2f})")
    assert err < ATOL
    # The windows matter: full attention in every block gives clearly different features.
    visual = ours.visual
    saved = visual.fullatt_block_indexes
    try:
        visual.fullatt_block_indexes = set(range(len(visual.blocks)))
        full = ours.embed_multimodal("image", dict(inputs))
    finally:
        visual.fullatt_block_indexes = saved
    assert (full - ref).abs().max().item() > 1e-2


@tiny_only
@torch.no_grad()
def test_vision_three_images_one_call(ours, hf, processor):
    images = [IMG_A, IMG_SMALL, IMG_ODD]
    inputs = processor(images=images, return_tensors="pt")
    grids = inputs["image_grid_thw"]
    assert grids.tolist() == [[1, 8, 10], [1, 4, 4], [1, 6, 14]]
    ref = _hf_features(hf, inputs["pixel_values"], grids)
    got = ours.embed_multimodal("image", {"pixel_values": inputs["pixel_values"], "image_grid_thw": grids})
    assert got.shape[0] == sum(num_mm_tokens(grids, 2)) == 45
    err = (got - ref).abs().max().item()
    print(f"three images max abs err {err:.3e}")
    assert err < ATOL
    # attention never crosses images: an image alone gives the same rows
    single = ours.embed_multimodal("image", dict(processor(images=[IMG_ODD], return_tensors="pt")))
    torch.testing.assert_close(got[24:], single, rtol=0, atol=1e-5)


@tiny_only
@torch.no_grad()
def test_vision_video(ours, hf, processor):
    frames = [tiny_vlm25.random_image(90, 120, seed=10 + i) for i in range(5)]  # padded to 6 frames
    pixel_values_videos, grid = tiny_vlm25.video_pixel_values(frames, processor)
    assert grid.tolist() == [[3, 6, 8]]
    ref = torch.cat(hf.model.get_video_features(pixel_values_videos, grid).pooler_output)
    got = ours.embed_multimodal("video", {"pixel_values_videos": pixel_values_videos, "video_grid_thw": grid})
    assert got.shape == (36, 64)
    err = (got - ref).abs().max().item()
    print(f"video max abs err {err:.3e}")
    assert err < ATOL


# ---------------------------------------------------------------------------------------------
# M-RoPE positions
# ---------------------------------------------------------------------------------------------


@tiny_only
def test_mrope_positions_match_hf(ours, hf, vlm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(vlm_dir))
    cfg = hf.config
    img_a, img_b, vid = [1, 8, 10], [1, 4, 4], [4, 4, 6]
    # Images: identical to Qwen2-VL, and to HF's Qwen2.5-VL get_rope_index.
    items = [("image", img_a), ("image", img_b)]
    ids = tiny_vlm25.image_prompt_ids(tok, items)
    ids_t = torch.tensor([ids])
    ref, ref_delta = hf.model.get_rope_index(ids_t, _token_types(ids_t, cfg), image_grid_thw=torch.tensor([img_a, img_b]))
    pos, delta = ours.get_mrope_positions(ids, [img_a, img_b])
    assert torch.equal(pos, ref[:, 0]) and delta == int(ref_delta)

    # Videos: temporal step tokens_per_second (2) * second_per_grid_ts; HF 5 then advances text
    # by max(h, w) / merge (hf5_spatial_advance), the original rule by the item's max + 1.
    items = [("image", img_b), ("video", vid), ("video", vid)]
    ids = tiny_vlm25.image_prompt_ids(tok, items)
    ids_t = torch.tensor([ids])
    spg = torch.tensor([1.5, 0.25])
    ref, ref_delta = hf.model.get_rope_index(
        ids_t, _token_types(ids_t, cfg), image_grid_thw=torch.tensor([img_b]),
        video_grid_thw=torch.tensor([vid, vid]), second_per_grid_ts=spg,
    )
    pos5, delta5 = get_mrope_positions(ids, [img_b], [vid, vid], cfg, spg, hf5_spatial_advance=True)
    # The text-after-video rule is transformers-version specific (5.17 on the GPU image differs
    # again); hf5_spatial_advance reproduces the 5.24 this suite pins.
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("5.24"):
        assert torch.equal(pos5, ref[:, 0]) and delta5 == int(ref_delta)
    start = ids.index(cfg.video_token_id)  # first video: 4 grids of 2 x 3 merged patches
    base = int(pos5[0, start])
    assert pos5[0, start : start + 24 : 6].tolist() == [base + 3 * i for i in range(4)]  # 2 * 1.5 per grid
    # No second_per_grid_ts: HF uses 1 s per grid (step = tokens_per_second); so does our model.
    ref, _ = hf.model.get_rope_index(
        ids_t, _token_types(ids_t, cfg), image_grid_thw=torch.tensor([img_b]), video_grid_thw=torch.tensor([vid, vid])
    )
    pos, _ = ours.get_mrope_positions(ids, [img_b], [vid, vid])
    assert torch.equal(pos[:, : start + 24], ref[:, 0, : start + 24])
    assert pos[0, start + 6] - pos[0, start] == 2


# ---------------------------------------------------------------------------------------------
# Engine: greedy generation equals HF generate
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(vlm_dir):
    return LLM(str(vlm_dir), dtype="float32", device="cpu", max_model_len=1024)


@pytest.fixture(scope="module")
def chunked_llm(vlm_dir):
    return LLM(str(vlm_dir), dtype="float32", device="cpu", max_model_len=1024, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def ref(hf, processor, llm):
    """ref(prompt_text, images) -> (expanded prompt ids, HF greedy continuation), cached."""
    return tiny_vlm25.hf_greedy_reference(hf, processor, llm.get_tokenizer(), MAX_TOKENS)


def assert_matches(out, ref, text: str, images: list | None = None) -> None:
    ids, expected = ref(text, images)
    assert out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == expected, (out.outputs[0].token_ids, expected)
    assert len(expected) > 0


def test_text_one_image_three_images_equal_hf(llm, ref):
    t_text = make_prompt(0, "Tell me a short story about a cat.")
    t_one = make_prompt(1)
    t_three = make_prompt(3, "Compare the three pictures.")
    three = [IMG_WIDE, IMG_SMALL, IMG_A]
    for prompt, text, images in [(t_text, t_text, None), (mm(t_one, IMG_A), t_one, [IMG_A]),
                                 (mm(t_three, three), t_three, three)]:
        out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
        assert_matches(out, ref, text, images)
    assert out.prompt_token_ids.count(llm.config.model.hf_config.image_token_id) == 22 + 4 + 20


def test_batch_and_image_embeds_equal_hf(llm, ref, hf, processor):
    embeds, grid = hf_image_embeds(hf, processor, IMG_ODD)
    assert embeds.shape == (21, 64)
    t_text = make_prompt(0, "Count from one to ten.")
    t_one = make_prompt(1, "Batch: what is in the image?")
    t_three = make_prompt(3, "Batch: describe all of them.")
    t_emb = make_prompt(1, "Batch: embeddings given.")
    cases = [(t_one, [IMG_ODD]), (t_text, []), (t_three, [IMG_SMALL, IMG_ODD, IMG_A]), (t_emb, None),
             (t_emb, [IMG_ODD])]
    prompts = [
        mm(t, {"image_embeds": embeds, "image_grid_thw": grid}) if imgs is None else (mm(t, imgs) if imgs else t)
        for t, imgs in cases
    ]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for out, (t, imgs) in zip(outs, cases):
        assert_matches(out, ref, t, [IMG_ODD] if imgs is None else imgs)
    # The embeddings form gives the same prompt and tokens as the same image given as pixels.
    assert outs[3].prompt_token_ids == outs[4].prompt_token_ids
    assert outs[3].outputs[0].token_ids == outs[4].outputs[0].token_ids


def test_chunked_prefill_through_image_tokens_equals_hf(chunked_llm, ref, monkeypatch):
    llm = chunked_llm
    runner = llm.core.runner
    steps = []
    orig_prepare = runner.prepare

    def prepare(out, prev=None):
        batch = orig_prepare(out, prev)
        steps.append((batch.input_ids.numel(), [(rid, lo, hi) for rid, _, lo, hi, _ in batch.mm_slices]))
        return batch

    monkeypatch.setattr(runner, "prepare", prepare)
    t_big = make_prompt(1, "Describe the large picture in detail.")
    t_three = make_prompt(3, "And these three?")
    three = [IMG_SMALL, IMG_A, IMG_WIDE]
    outs = llm.generate([mm(t_big, IMG_BIG), mm(t_three, three)], GREEDY, use_tqdm=False)
    assert_matches(outs[0], ref, t_big, [IMG_BIG])
    assert_matches(outs[1], ref, t_three, three)
    assert all(n <= 16 for n, _ in steps)
    big = [(lo, hi) for _, slices in steps for rid, lo, hi in slices if rid == outs[0].request_id]
    assert len(big) >= 4 and big[0][0] == 0 and big[-1][1] == 63  # the 63-token run was cut up
