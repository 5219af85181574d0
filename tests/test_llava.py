"""LLaVA-1.5 end to end: ``LLM(...).generate`` against HF ``LlavaForConditionalGeneration.generate``
on a tiny random checkpoint (fp32, CPU, greedy, token for token), plus the checkpoint layouts,
the vision tower against HF's ``get_image_features``, the prefix cache with images, and input
errors that must fail before anything is queued.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

import tiny_llava
from weight_scale import build_at_scale, tiny_only
from engine import LLM, SamplingParams
from engine.loader import iterate_weights
from engine.models import get_model_class
from engine.models.llava import LlavaForConditionalGeneration, get_image_token_id, num_image_features
from kernels import get_backend

MAX_NEW = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
BLOCK = 16
# LLaVA-1.5's system prompt: long enough that whole text-only KV blocks precede the first image.
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def prompt_text(num_images: int, question: str = "Describe the picture.") -> str:
    return f"{SYSTEM} USER: " + "<image>\n" * num_images + f"{question} ASSISTANT:"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only add spin-waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, scale):
    # generation equality runs at both weight scales (weight_scale); checks of names, layouts and
    # input errors at the tiny one
    return build_at_scale(tiny_llava.build_tiny_llava, tmp_path_factory.mktemp(f"tiny_llava_{scale}"), scale, seed=0)


@pytest.fixture(scope="module")
def hf_model(llava_dir):
    return tiny_llava.load_hf_llava(llava_dir)


@pytest.fixture(scope="module")
def image_processor(llava_dir):
    return tiny_llava.load_image_processor(llava_dir)


@pytest.fixture(scope="module")
def tok(llava_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llava_dir))


def make_llm(model_dir, **kwargs) -> LLM:
    args = dict(dtype="float32", device="cpu", seed=0, max_model_len=512, block_size=BLOCK,
                enable_prefix_caching=True, limit_mm_per_prompt={"image": 2})
    args.update(kwargs)
    return LLM(str(model_dir), **args)


@pytest.fixture(scope="module")
def llm(llava_dir):
    return make_llm(llava_dir)


IMG_A = tiny_llava.random_image(70, 90, seed=1)  # landscape: resized then center-cropped
IMG_B = tiny_llava.random_image(120, 64, seed=2)  # portrait, another size
IMG_C = tiny_llava.random_image(56, 56, seed=3)  # exactly the tower's size


_HF_MEMO: dict[tuple, list[int]] = {}


@torch.no_grad()
def hf_greedy(hf_model, image_processor, tok, text: str, images: list, max_new: int = MAX_NEW) -> list[int]:
    """HF reference: prompt ids with each <image> expanded (as HF's LlavaProcessor does), pixel_values
    of all images, ``generate(do_sample=False)``; eos kept when generation stopped on it."""
    key = (id(hf_model), text, tuple(id(i) for i in images), max_new)  # one memo for both weight scales
    if key not in _HF_MEMO:
        n = tiny_llava.num_image_tokens(hf_model.config)
        ids = tiny_llava.expand_image_tokens(tok(text).input_ids, hf_model.config.image_token_id, n)
        inp = torch.tensor([ids])
        extra = {}
        if images:
            extra["pixel_values"] = image_processor(images=images, return_tensors="pt")["pixel_values"]
        out = hf_model.generate(
            inp, attention_mask=torch.ones_like(inp), do_sample=False, max_new_tokens=max_new,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None,
            **extra,
        )
        _HF_MEMO[key] = out[0, inp.shape[1]:].tolist()
    return _HF_MEMO[key]


def expanded_ids(hf_model, tok, text: str) -> list[int]:
    n = tiny_llava.num_image_tokens(hf_model.config)
    return tiny_llava.expand_image_tokens(tok(text).input_ids, hf_model.config.image_token_id, n)


@torch.no_grad()
def hf_image_embeds(hf_model, image_processor, images: list) -> torch.Tensor:
    """(num_images, feature_size, lm_hidden) from HF's own get_image_features."""
    pv = image_processor(images=images, return_tensors="pt")["pixel_values"]
    feats = hf_model.get_image_features(pixel_values=pv).pooler_output
    return torch.stack(list(feats))


def mm(images: list) -> dict:
    return {"multi_modal_data": {"image": images}} if images else {}


def assert_idle(llm: LLM) -> None:
    bm, sched = llm.core.block_manager, llm.core.scheduler
    assert not llm.core.has_unfinished()
    assert not sched.waiting and not sched.running and not sched.requests
    assert bm.num_free_blocks == bm.num_usable_blocks


# ---------------------------------------------------------------------------------------------
# Checkpoint, model, processor
# ---------------------------------------------------------------------------------------------


@tiny_only
def test_config_and_checkpoint_names(llava_dir, hf_model):
    cfg = hf_model.config
    # transformers 5 keeps image_token_index in config.json and aliases image_token_id to it.
    assert cfg.image_token_id == cfg.image_token_index == get_image_token_id(cfg)
    assert get_image_token_id(SimpleNamespace(image_token_index=7)) == 7
    assert get_image_token_id(SimpleNamespace(image_token_id=9, image_token_index=None)) == 9
    assert num_image_features(cfg) == (56 // 14) ** 2 == 16
    # transformers 5.24's save_pretrained layout: legacy top-level prefixes, no vision_model level.
    names = {n for n, _ in iterate_weights(llava_dir)}
    assert "language_model.model.embed_tokens.weight" in names and "language_model.lm_head.weight" in names
    assert "multi_modal_projector.linear_1.weight" in names
    assert "vision_tower.embeddings.patch_embedding.weight" in names
    assert "vision_tower.pre_layrnorm.weight" in names and "vision_tower.post_layernorm.weight" in names
    assert not any(n.startswith(("model.", "vision_tower.vision_model.")) for n in names)


def _renamed(weights, fn):
    return [(fn(n), t) for n, t in weights]


@tiny_only
def test_load_weights_layouts_and_vision_features(llava_dir, hf_model, image_processor):
    backend = get_backend("cpu")
    assert get_model_class("LlavaForConditionalGeneration") is LlavaForConditionalGeneration
    ours = LlavaForConditionalGeneration(hf_model.config, backend).eval()
    loaded = ours.load_weights(iterate_weights(llava_dir))
    assert loaded == {n for n, _ in ours.named_parameters()}
    assert ours.uses_mrope is False and (ours.num_layers, ours.num_kv_heads, ours.head_dim) == (2, 2, 16)
    # vision_feature_layer=-2 of 2 layers: only the first encoder layer is built (and run).
    assert len(ours.vision_tower.encoder.layers) == 1
    ref = {k: v.clone() for k, v in ours.state_dict().items()}

    saved = list(iterate_weights(llava_dir))
    layouts = {
        # transformers 4.x / llava-hf hub checkpoints: CLIPVisionModel's vision_model level
        "hub 4.x": _renamed(saved, lambda n: n.replace("vision_tower.", "vision_tower.vision_model.", 1)),
        # in-memory module names (transformers >= 4.52 and 5.x)
        "in-memory": list(hf_model.state_dict().items()),
    }
    for what, weights in layouts.items():
        other = LlavaForConditionalGeneration(hf_model.config, backend).eval()
        assert other.load_weights(weights) == loaded, what
        for k, v in other.state_dict().items():
            assert torch.equal(v, ref[k]), f"{what}: {k}"
    with pytest.raises(ValueError, match="unexpected weight"):
        ours.load_weights([("vision_tower.bogus.weight", torch.zeros(1))])

    pv = image_processor(images=[IMG_A, IMG_B], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = torch.cat(list(hf_model.get_image_features(pixel_values=pv).pooler_output))
        got = torch.cat([ours.embed_multimodal("image", {"pixel_values": pv[i : i + 1]}) for i in range(2)])
    assert got.shape == (32, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    emb = torch.randn(16, 64)
    assert ours.embed_multimodal("image", {"image_embeds": emb}) is emb


@pytest.mark.parametrize("strategy,layers", [("full", [-2, -1]), ("default", 0)])
def test_feature_strategy_and_layers(tmp_path, strategy, layers):
    """"full" keeps the CLS token (17 features); a layer list concatenates hidden states; layer 0
    is the embeddings after pre_layrnorm (no encoder layer built)."""
    d = tiny_llava.build_tiny_llava(tmp_path, seed=1, vision_feature_select_strategy=strategy,
                                    vision_feature_layer=layers)
    hf = tiny_llava.load_hf_llava(d)
    ours = LlavaForConditionalGeneration(hf.config, get_backend("cpu")).eval()
    assert ours.load_weights(iterate_weights(d)) == {n for n, _ in ours.named_parameters()}
    n = 17 if strategy == "full" else 16
    assert ours.num_image_tokens == num_image_features(hf.config) == n
    assert len(ours.vision_tower.encoder.layers) == (2 if layers == [-2, -1] else 0)
    pv = tiny_llava.load_image_processor(d)(images=[IMG_B], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        # output_hidden_states=True: HF 5.24 turns vision_feature_layer=0 into
        # output_hidden_states=0 (falsy) and then finds no hidden states.
        expected = hf.get_image_features(pixel_values=pv, output_hidden_states=True).pooler_output[0]
        got = ours.embed_multimodal("image", {"pixel_values": pv})
    assert got.shape == (n, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Generation against HF
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("images", [[], [IMG_A], [IMG_A, IMG_B]], ids=["no_image", "one_image", "two_images"])
def test_generate_matches_hf(llm, hf_model, image_processor, tok, images):
    text = prompt_text(len(images))
    out = llm.generate({"prompt": text, **mm(images)}, GREEDY)[0]
    assert out.prompt_token_ids == expanded_ids(hf_model, tok, text)
    assert out.outputs[0].token_ids == hf_greedy(hf_model, image_processor, tok, text, images)
    assert_idle(llm)


def test_precomputed_embeddings_match_pixels(llm, hf_model, image_processor, tok):
    images = [IMG_A, IMG_B]
    text = prompt_text(2)
    embeds = hf_image_embeds(hf_model, image_processor, images)
    assert embeds.shape == (2, 16, 64)
    by_embeds = llm.generate({"prompt": text, "multi_modal_data": {"image": embeds}}, GREEDY)[0]
    by_pixels = llm.generate({"prompt": text, **mm(images)}, GREEDY)[0]
    expected = hf_greedy(hf_model, image_processor, tok, text, images)
    assert by_embeds.prompt_token_ids == by_pixels.prompt_token_ids
    assert by_embeds.outputs[0].token_ids == by_pixels.outputs[0].token_ids == expected
    # One image's embeddings as a 2-D (feature_size, hidden) tensor.
    one = llm.generate({"prompt": prompt_text(1), "multi_modal_data": {"image": embeds[0]}}, GREEDY)[0]
    assert one.outputs[0].token_ids == hf_greedy(hf_model, image_processor, tok, prompt_text(1), [IMG_A])


def test_batch_mixing_inputs(llm, hf_model, image_processor, tok):
    embeds = hf_image_embeds(hf_model, image_processor, [IMG_C])
    cases = [
        ({"prompt": prompt_text(1, "What is in the image?"), **mm([IMG_B])}, [IMG_B]),
        ({"prompt": prompt_text(0, "Tell me a story.")}, []),
        ({"prompt": prompt_text(2, "Compare the two images."), **mm([IMG_C, IMG_A])}, [IMG_C, IMG_A]),
        ({"prompt": prompt_text(1, "What is in the image?"), "multi_modal_data": {"image": embeds}}, [IMG_C]),
        ({"prompt": prompt_text(1, "What is in the image?"), **mm([IMG_C])}, [IMG_C]),
    ]
    outs = llm.generate([c for c, _ in cases], GREEDY, use_tqdm=False)
    for i, ((case, images), out) in enumerate(zip(cases, outs)):
        expected = hf_greedy(hf_model, image_processor, tok, case["prompt"], images)
        assert out.outputs[0].token_ids == expected, f"request {i}"
    assert outs[3].outputs[0].token_ids == outs[4].outputs[0].token_ids
    assert_idle(llm)


def test_chunked_prefill_through_image_tokens(llava_dir, hf_model, image_processor, tok):
    llm = make_llm(llava_dir, max_num_batched_tokens=16, enable_prefix_caching=False)
    cases = [(prompt_text(2), [IMG_A, IMG_B]), (prompt_text(1, "What is in the image?"), [IMG_C])]
    for text, _ in cases:  # the 16-token chunks really cut through the images' placeholder runs
        ids = expanded_ids(hf_model, tok, text)
        first = ids.index(hf_model.config.image_token_id)
        assert first % 16 != 0 and len(ids) > 32
    outs = llm.generate([{"prompt": t, **mm(imgs)} for t, imgs in cases], GREEDY, use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, image_processor, tok, text, images)
    assert_idle(llm)


def test_prefix_cache_hits_same_image_misses_other(llava_dir, hf_model, image_processor, tok):
    llm = make_llm(llava_dir)
    bm = llm.core.block_manager
    text = prompt_text(1)
    ids = expanded_ids(hf_model, tok, text)
    first_image = ids.index(hf_model.config.image_token_id)
    text_blocks = first_image // BLOCK  # full blocks of text before the image
    assert text_blocks >= 1

    first = llm.generate({"prompt": text, **mm([IMG_A])}, GREEDY)[0]
    hits = bm.num_hit_tokens
    again = llm.generate({"prompt": text, **mm([IMG_A.copy()])}, GREEDY)[0]  # same pixels, new object
    assert bm.num_hit_tokens - hits == (len(ids) - 1) // BLOCK * BLOCK > first_image + 16
    assert again.outputs[0].token_ids == first.outputs[0].token_ids

    hits = bm.num_hit_tokens
    other = llm.generate({"prompt": text, **mm([IMG_B])}, GREEDY)[0]
    assert bm.num_hit_tokens - hits == text_blocks * BLOCK  # only the text before the image
    assert other.outputs[0].token_ids != first.outputs[0].token_ids
    assert other.outputs[0].token_ids == hf_greedy(hf_model, image_processor, tok, text, [IMG_B])
    assert first.outputs[0].token_ids == hf_greedy(hf_model, image_processor, tok, text, [IMG_A])
    assert_idle(llm)


# ---------------------------------------------------------------------------------------------
# Input errors: raised before anything is queued
# ---------------------------------------------------------------------------------------------


def _truncated_png():
    from PIL import Image

    buf = io.BytesIO()
    tiny_llava.random_image(64, 64, seed=4).save(buf, format="PNG")
    data = buf.getvalue()
    return Image.open(io.BytesIO(data[: len(data) // 2]))  # opens lazily; decoding fails later


@tiny_only
def test_too_many_images_rejected_before_queueing(llm):
    good = {"prompt": prompt_text(1), **mm([IMG_A])}
    bad = {"prompt": prompt_text(3), **mm([IMG_A, IMG_B, IMG_C])}
    with pytest.raises(ValueError, match=r"limit_mm_per_prompt\['image'\]=2"):
        llm.generate([good, bad], GREEDY, use_tqdm=False)
    assert_idle(llm)


@tiny_only
@pytest.mark.parametrize(
    "items,match",
    [
        ([IMG_A, "corrupt"], r"image 1: .*got str"),
        ([b"\x89PNG\r\n\x1a\n garbage"], r"image 0: .*got bytes"),
        ([IMG_A, "truncated png"], r"image 1 could not be processed"),
        ([torch.zeros(16, 32)], r"image 0: precomputed embeddings must have shape \(16, 64\)"),
    ],
    ids=["str", "bytes", "truncated_png", "bad_embeds"],
)
def test_bad_images_raise_naming_the_item(llm, items, match):
    items = [_truncated_png() if i == "truncated png" else i for i in items]
    good = {"prompt": prompt_text(1), **mm([IMG_A])}
    bad = {"prompt": prompt_text(len(items)), **mm(items)}
    with pytest.raises(ValueError, match=match):
        llm.generate([good, bad], GREEDY, use_tqdm=False)
    assert_idle(llm)


@tiny_only
def test_placeholder_count_mismatch(llm):
    with pytest.raises(ValueError, match="1 image placeholder"):
        llm.generate({"prompt": prompt_text(1), **mm([IMG_A, IMG_B])}, GREEDY)
    assert_idle(llm)


@tiny_only
def test_chat_renders_image_placeholders(llm, hf_model, image_processor, tok):
    if not hasattr(llm, "chat"):
        pytest.skip("LLM.chat not available")
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "image", "image": IMG_A}, {"type": "text", "text": "Describe the picture."}]},
    ]
    out = llm.chat(messages, GREEDY)[0]
    text = prompt_text(1)
    assert out.prompt_token_ids == expanded_ids(hf_model, tok, text)
    assert out.outputs[0].token_ids == hf_greedy(hf_model, image_processor, tok, text, [IMG_A])
