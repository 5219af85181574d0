"""MiniCPM-V 2.6 (``MiniCPMV``) end to end against an independent reference (``tiny_minicpmv.Oracle``:
transformers' ``Qwen2ForCausalLM`` + ``SiglipVisionModel`` with the slicing, NaViT positions and
resampler glue written in the test helper), on tiny random checkpoints at two weight scales, fp32 on
CPU, greedy, token for token: one image, two images, a batch, prefix-cache hits and chunked
prefill; the grid choice and placeholder counts against the published processor's formulas; the
``image_embeds`` + ``image_size_list`` form against the pixel path; ``llm.chat``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_minicpmv
from engine import SamplingParams
from guide_model_helpers import BLOCK, MAX_NEW, assert_idle, expected, make_llm, mm, one_thread  # noqa: F401 (fixture)
from engine.loader import iterate_weights
from engine.mm_processors.minicpmv_slicing import SliceConfig, num_slices, placeholder_text, slice_images_u8

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
TAG = "(<image>./</image>)"

IMG_A = tiny_minicpmv.random_image(400, 600, seed=1)  # 2x1 slices + overview
IMG_B = tiny_minicpmv.random_image(900, 300, seed=2)  # tall: 1x3 slices
IMG_C = tiny_minicpmv.random_image(200, 200, seed=3)  # small: overview only (upscaled)


def prompt(question: str, num_images: int) -> str:
    tags = "".join(f"{TAG}\n" for _ in range(num_images))
    return (f"<|im_start|>system\nYou look at pictures carefully.<|im_end|>\n"
            f"<|im_start|>user\n{tags}{question}<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module", params=[0.02, 0.2], ids=["scale0.02", "scale0.2"])
def model_dir(request, tmp_path_factory):
    return tiny_minicpmv.build_tiny_minicpmv(tmp_path_factory.mktemp("tiny_minicpmv"), scale=request.param)


@pytest.fixture(scope="module")
def oracle(model_dir):
    return tiny_minicpmv.Oracle(model_dir)


@pytest.fixture(scope="module")
def llm(model_dir):
    return make_llm(model_dir)


# ---------------------------------------------------------------------------------------------
# Slicing, placeholders, config, vision features
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_slice_nums", [1, 4, 9])
def test_slicing_matches_published_formulas(max_slice_nums):
    cfg = SliceConfig(max_slice_nums=max_slice_nums)
    pub = tiny_minicpmv.Published(max_slice_nums=max_slice_nums)
    sizes = [(600, 400), (300, 900), (200, 200), (1300, 500), (448, 448), (449, 448), (3000, 100),
             (100, 3000), (1344, 1344), (5000, 4000), (1, 1), (14, 2000), (897, 448)]
    for size in sizes:
        grid = pub.get_sliced_grid(size)
        assert num_slices(size, cfg) == 1 + (grid[0] * grid[1] if grid else 0), size
        text = placeholder_text(size, 3, cfg)
        assert text == pub.get_slice_image_placeholder(size, 3), size
        assert text.count("<unk>") == num_slices(size, cfg) * 64
    for size in sizes[:6]:  # the slices themselves: same pixels as the transcribed processor's
        image = tiny_minicpmv.random_image(size[1], size[0], seed=size[0])
        got = slice_images_u8(image, cfg)
        want = [torch.from_numpy(np.array(s)) for s in pub.slice_image(image)]
        assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want], size
        assert all(torch.equal(torch.from_numpy(g), w) for g, w in zip(got, want)), size


def test_native_config_tokenizer_and_checkpoint(model_dir, llm):
    # The folder names remote config / tokenizer code it does not contain; the engine never needs it.
    assert not list(model_dir.glob("*.py"))
    cfg = llm.config.model.hf_config
    assert llm.config.model.architecture == "MiniCPMV" and cfg.query_num == 64 and cfg.vision_config["patch_size"] == 14
    names = {n for n, _ in iterate_weights(model_dir)}
    assert {"llm.model.embed_tokens.weight", "llm.lm_head.weight", "vpm.embeddings.patch_embedding.weight",
            "vpm.post_layernorm.weight", "resampler.attn.in_proj_weight", "resampler.proj",
            "resampler.kv_proj.weight", "resampler.query"} <= names
    assert len(llm.core.runner.model.resampler.attn.in_proj_bias) == 3 * 256


def test_vision_embeddings_match_oracle(llm, oracle):
    """Every overview / slice, batched in one padded tower pass, against the oracle's one-by-one."""
    runner, mp = llm.core.runner, llm.processor.mm_processor
    feats = mp.process(mp.tokenize(f"{TAG}{TAG}{TAG}"), {"image": [IMG_A, IMG_B, IMG_C]}).mm_features
    assert [f.length for f in feats] == [64] * (3 + 4 + 1)
    with torch.no_grad():
        got = torch.stack(runner.model.embed_multimodal_batch(
            "image", runner.mm_preprocessor.prepare("image", [f.data for f in feats])))
    want = torch.cat([oracle.slice_embeds(im) for im in (IMG_A, IMG_B, IMG_C)])
    assert got.shape == want.shape == (8, 64, 256)
    assert float((got - want).norm() / want.norm()) < 1e-5


# ---------------------------------------------------------------------------------------------
# Generation against the oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("images", [[], [IMG_A], [IMG_B, IMG_C]], ids=["no_image", "one_image", "two_images"])
def test_generate_matches_oracle(llm, oracle, images):
    text = prompt("Describe the picture.", len(images))
    out = llm.generate({"prompt": text, **mm(images)}, GREEDY)[0]
    assert out.prompt_token_ids == oracle.prompt_ids(text, images)
    assert out.outputs[0].token_ids == expected(oracle, text, images)
    assert_idle(llm)


def test_logprobs_match_oracle_and_depend_on_the_image(llm, oracle):
    """Greedy tokens alone say little at initializer_range 0.02 (the output hardly depends on the
    input); the top-5 logprobs must match the oracle's and differ between two images."""
    if oracle.lm.config.initializer_range != 0.02:
        pytest.skip("the 0.02 checkpoint's check")
    text = prompt("Describe the picture.", 1)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=5, ignore_eos=True)
    per_image = []
    for image in (IMG_A, IMG_C):
        c = llm.generate({"prompt": text, **mm([image])}, params)[0].outputs[0]
        want = oracle.logprobs(text, [image], c.token_ids)
        got = torch.full_like(want, float("nan"))
        for i, entry in enumerate(c.logprobs):
            for token, lp in entry.items():
                got[i, token] = lp.logprob
        seen = ~got.isnan()
        assert int(seen.sum()) >= 5 * MAX_NEW
        torch.testing.assert_close(got[seen], want[seen], rtol=0, atol=2e-5)
        per_image.append(want)
    assert (per_image[0] - per_image[1]).abs().max() > 1e-3


def test_image_embeds_with_image_size_list_equal_pixel_path(llm, oracle):
    """vLLM's form: the resampler outputs of every slice plus each image's (width, height)."""
    text = prompt("Compare the two images.", 2)
    pixels = llm.generate({"prompt": text, **mm([IMG_A, IMG_B])}, GREEDY)[0]
    forms = [
        {"image_embeds": [oracle.slice_embeds(IMG_A), oracle.slice_embeds(IMG_B)],
         "image_size_list": [IMG_A.size, IMG_B.size]},
        # one tensor for two images of the same slice count; rows flattened per image
        {"image_embeds": torch.stack([oracle.slice_embeds(IMG_A).flatten(0, 1)] * 2),
         "image_size_list": [IMG_A.size, IMG_A.size]},
    ]
    outs = [llm.generate({"prompt": text, "multi_modal_data": {"image": f}}, GREEDY)[0] for f in forms]
    assert outs[0].prompt_token_ids == pixels.prompt_token_ids
    assert outs[0].outputs[0].token_ids == pixels.outputs[0].token_ids == expected(oracle, text, [IMG_A, IMG_B])
    assert outs[1].outputs[0].token_ids == expected(oracle, text, [IMG_A, IMG_A])
    with pytest.raises(ValueError, match="image_size_list"):
        llm.generate({"prompt": prompt("Hi.", 1), "multi_modal_data": {"image": {"image_embeds": forms[0]["image_embeds"][0]}}}, GREEDY)
    with pytest.raises(ValueError, match=r"600x400 image must hold 3 slice\(s\)"):  # IMG_B's embeddings with IMG_A's size
        llm.generate({"prompt": prompt("Hi.", 1), "multi_modal_data": {"image": {
            "image_embeds": forms[0]["image_embeds"][1], "image_size_list": [IMG_A.size]}}}, GREEDY)
    assert_idle(llm)


def test_batch_mixing_inputs(llm, oracle):
    cases = [
        (prompt("What is in the image?", 1), [IMG_B], {"image": [IMG_B]}),
        (prompt("Tell me a story.", 0), [], None),
        (prompt("Compare the two images.", 2), [IMG_C, IMG_A], {"image": [IMG_C, IMG_A]}),
        (prompt("What is in the image?", 1), [IMG_C],
         {"image": {"image_embeds": oracle.slice_embeds(IMG_C), "image_size_list": [IMG_C.size]}}),
        (prompt("What is in the image?", 1), [IMG_C], {"image": [IMG_C]}),
    ]
    reqs = [{"prompt": t, **({"multi_modal_data": d} if d else {})} for t, _, d in cases]
    outs = llm.generate(reqs, GREEDY, use_tqdm=False)
    for i, ((text, images, _), out) in enumerate(zip(cases, outs)):
        assert out.outputs[0].token_ids == expected(oracle, text, images), f"request {i}"
    assert outs[3].outputs[0].token_ids == outs[4].outputs[0].token_ids
    assert_idle(llm)


def test_chunked_prefill_through_image_tokens(model_dir, oracle):
    llm = make_llm(model_dir, max_num_batched_tokens=96, enable_prefix_caching=False)
    cases = [(prompt("Compare the two images.", 2), [IMG_A, IMG_B]), (prompt("What is this?", 1), [IMG_C])]
    for text, images in cases:  # 96-token chunks cut through the <unk> runs
        bounds = oracle.image_bounds(oracle.prompt_ids(text, images))
        assert any(s // 96 != (e - 1) // 96 for s, e in bounds)
    outs = llm.generate([{"prompt": t, **mm(imgs)} for t, imgs in cases], GREEDY, use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert out.outputs[0].token_ids == expected(oracle, text, images)
    assert_idle(llm)


def test_prefix_cache_hits_same_image_misses_other(model_dir, oracle):
    llm = make_llm(model_dir)
    bm = llm.core.block_manager
    text = prompt("Describe the picture.", 1)
    ids = oracle.prompt_ids(text, [IMG_A])
    first_unk = oracle.image_bounds(ids)[0][0]
    text_blocks = first_unk // BLOCK  # whole blocks before the first image row
    assert text_blocks >= 1
    first = llm.generate({"prompt": text, **mm([IMG_A])}, GREEDY)[0]
    hits = bm.num_hit_tokens
    again = llm.generate({"prompt": text, **mm([IMG_A.copy()])}, GREEDY)[0]  # same pixels, new object
    assert bm.num_hit_tokens - hits == (len(ids) - 1) // BLOCK * BLOCK
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == expected(oracle, text, [IMG_A])
    hits = bm.num_hit_tokens
    other = llm.generate({"prompt": text, **mm([IMG_B])}, GREEDY)[0]
    assert bm.num_hit_tokens - hits == text_blocks * BLOCK  # only the text before the image
    assert other.outputs[0].token_ids == expected(oracle, text, [IMG_B])
    assert_idle(llm)


def test_chat_with_string_only_template(llm, oracle):
    """MiniCPM-V's template takes string content: the image part becomes (<image>./</image>) in front
    of the text, joined by a newline (as the published ``chat`` writes it)."""
    messages = [{"role": "user", "content": [{"type": "image", "image": IMG_A},
                                             {"type": "text", "text": "Describe the picture."}]}]
    out = llm.chat(messages, GREEDY)[0]
    text = (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{TAG}\nDescribe the picture.<|im_end|>\n<|im_start|>assistant\n")
    assert out.prompt_token_ids == oracle.prompt_ids(text, [IMG_A])
    assert out.outputs[0].token_ids == expected(oracle, text, [IMG_A])


def test_tag_count_mismatch_rejected(llm):
    with pytest.raises(ValueError, match="1 image placeholder"):
        llm.generate({"prompt": prompt("Describe.", 1), **mm([IMG_A, IMG_B])}, GREEDY)
    assert_idle(llm)
