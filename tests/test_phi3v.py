"""Phi-3-vision (``Phi3VForCausalLM``) end to end against an independent reference (``tiny_phi3v.Oracle``:
transformers' ``Phi3ForCausalLM`` + ``CLIPVisionModel`` with the HD-transform glue written in the
test helper), on tiny random checkpoints at two weight scales, fp32 on CPU, greedy, token for
token: one image, two images, a batch, prefix-cache hits and chunked prefill; the image-token
counts against the published processor's formula; the guide's ``LLM(...)`` arguments; ``llm.chat``
with Phi-3.5-vision's string-only chat template; LongRoPE's long factors.
"""

from __future__ import annotations

import pytest
import torch

import tiny_phi3v
from engine import LLM, SamplingParams
from guide_model_helpers import BLOCK, MAX_NEW, assert_idle, expected, make_llm, mm, one_thread  # noqa: F401 (fixture)
from engine.loader import iterate_weights
from engine.mm_processors.phi3v_pixels import hd_image_u8, hd_size, num_image_tokens

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
SYSTEM = "<|system|>\nYou are a helpful assistant who looks at pictures carefully.<|end|>\n"

IMG_A = tiny_phi3v.random_image(200, 500, seed=1)  # landscape: 2 crops across (num_crops=4)
IMG_B = tiny_phi3v.random_image(420, 180, seed=2)  # portrait: transposed, padded, transposed back
IMG_C = tiny_phi3v.random_image(336, 336, seed=3)  # square: a 2x2 grid of crops


def prompt(question: str, num_images: int) -> str:
    tags = "".join(f"<|image_{i}|>\n" for i in range(1, num_images + 1))
    return f"{SYSTEM}<|user|>\n{tags}{question}<|end|>\n<|assistant|>\n"


@pytest.fixture(scope="module", params=[0.02, 0.2], ids=["scale0.02", "scale0.2"])
def phi3v_dir(request, tmp_path_factory):
    return tiny_phi3v.build_tiny_phi3v(tmp_path_factory.mktemp("tiny_phi3v"), scale=request.param, seed=0)


@pytest.fixture(scope="module")
def oracle(phi3v_dir):
    return tiny_phi3v.Oracle(phi3v_dir)


@pytest.fixture(scope="module")
def llm(phi3v_dir):
    return make_llm(phi3v_dir)


# ---------------------------------------------------------------------------------------------
# Counts, config, weights, vision features
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_crops", [1, 4, 16])
def test_image_token_counts_match_published_formula(num_crops):
    sizes = [(500, 200), (180, 420), (336, 336), (1, 1), (50, 800), (800, 50), (1344, 1008), (337, 335), (3000, 2000)]
    for w, h in sizes:
        hh, ww = hd_size(w, h, num_crops)
        assert hh % 336 == 0 and ww % 336 == 0 and (hh // 336) * (ww // 336) <= num_crops
        assert num_image_tokens(hh, ww) == tiny_phi3v.published_token_count(w, h, num_crops), (w, h)
    for w, h in sizes[:4]:  # the resized pixels have exactly that size
        assert hd_image_u8(tiny_phi3v.random_image(h, w, seed=w), num_crops).shape == (*hd_size(w, h, num_crops), 3)


def test_native_config_and_checkpoint(phi3v_dir, llm):
    # The folder names remote code it does not contain; the engine never needs it.
    assert not list(phi3v_dir.glob("*.py"))
    cfg = llm.config.model.hf_config
    assert llm.config.model.architecture == "Phi3VForCausalLM"
    assert cfg.rope_parameters["rope_type"] == "longrope" and cfg.img_processor["num_img_tokens"] == 144
    names = {n for n, _ in iterate_weights(phi3v_dir)}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.qkv_proj.weight",
            "model.layers.0.mlp.gate_up_proj.weight", "model.vision_embed_tokens.glb_GN",
            "model.vision_embed_tokens.img_projection.2.weight",
            "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.1.mlp.fc1.weight"} <= names
    model = llm.core.runner.model
    # layer_idx -2 of a 2-layer tower: only the first layer is built.
    assert len(model.vision_embed_tokens.img_processor.encoder.layers) == 1


def test_vision_embeddings_match_oracle(llm, oracle):
    runner = llm.core.runner
    for image in (IMG_A, IMG_B, IMG_C):
        feat = llm.processor.mm_processor.process([oracle.image_token_id], {"image": [image]}).mm_features[0]
        (data,) = runner.mm_preprocessor.prepare("image", [feat.data])
        with torch.no_grad():
            got = runner.model.embed_multimodal("image", data)
        want = oracle.image_embeds(image)
        assert got.shape == want.shape == (feat.length, 64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


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
    text = prompt("Describe the picture.", 1)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=5, ignore_eos=True)
    per_image = []
    for image in (IMG_A, IMG_B):
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


def test_batch_mixing_inputs(llm, oracle):
    embeds = oracle.image_embeds(IMG_C)
    cases = [
        (prompt("What is in the image?", 1), [IMG_B], {"image": [IMG_B]}),
        (prompt("Tell me a story.", 0), [], None),
        (prompt("Compare the two images.", 2), [IMG_C, IMG_A], {"image": [IMG_C, IMG_A]}),
        (prompt("What is in the image?", 1), [IMG_C], {"image": [embeds]}),  # precomputed embeddings
        (prompt("What is in the image?", 1), [IMG_C], {"image": [IMG_C]}),
    ]
    reqs = [{"prompt": t, **({"multi_modal_data": d} if d else {})} for t, _, d in cases]
    outs = llm.generate(reqs, GREEDY, use_tqdm=False)
    for i, ((text, images, _), out) in enumerate(zip(cases, outs)):
        assert out.outputs[0].token_ids == expected(oracle, text, images), f"request {i}"
    assert outs[3].outputs[0].token_ids == outs[4].outputs[0].token_ids
    assert_idle(llm)


def test_chunked_prefill_through_image_tokens(phi3v_dir, oracle):
    llm = make_llm(phi3v_dir, max_num_batched_tokens=96, enable_prefix_caching=False)
    cases = [(prompt("Compare the two images.", 2), [IMG_A, IMG_B]), (prompt("What is this?", 1), [IMG_C])]
    for text, images in cases:  # 96-token chunks cut through the image runs
        ids = oracle.prompt_ids(text, images)
        assert ids.index(oracle.image_token_id) % 96 != 0 and len(ids) > 3 * 96
    outs = llm.generate([{"prompt": t, **mm(imgs)} for t, imgs in cases], GREEDY, use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert out.outputs[0].token_ids == expected(oracle, text, images)
    assert_idle(llm)


def test_prefix_cache_hits_same_image_misses_other(phi3v_dir, oracle):
    llm = make_llm(phi3v_dir)
    bm = llm.core.block_manager
    text = prompt("Describe the picture.", 1)
    ids = oracle.prompt_ids(text, [IMG_A])
    text_blocks = ids.index(oracle.image_token_id) // BLOCK  # whole blocks of text before the image
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
    """Phi-3.5-vision's template takes string content: the image part becomes <|image_1|> in front
    of the text (joined by a newline), and the rendered prompt is processed like a text prompt."""
    messages = [{"role": "user", "content": [{"type": "image", "image": IMG_A},
                                             {"type": "text", "text": "Describe the picture."}]}]
    out = llm.chat(messages, GREEDY)[0]
    text = "<|user|>\n<|image_1|>\nDescribe the picture.<|end|>\n<|assistant|>\n"
    assert out.prompt_token_ids == oracle.prompt_ids(text, [IMG_A])
    assert out.outputs[0].token_ids == expected(oracle, text, [IMG_A])


def test_bad_image_tags_rejected(llm):
    bad = prompt("Compare.", 0) + "<|image_2|><|image_1|>"
    with pytest.raises(ValueError, match=r"image tags must be <\|image_1\|> \.\. <\|image_2\|> in order"):
        llm.generate({"prompt": bad, **mm([IMG_A, IMG_B])}, GREEDY)
    with pytest.raises(ValueError, match="1 image placeholder"):
        llm.generate({"prompt": prompt("Describe.", 1), **mm([IMG_A, IMG_B])}, GREEDY)
    assert_idle(llm)


def test_longrope_long_factors(tmp_path):
    """max_model_len above original_max_position_embeddings: LongRoPE's long factors for every
    position, which is what HF uses for a sequence longer than the original length."""
    d = tiny_phi3v.build_tiny_phi3v(tmp_path, scale=0.2, seed=3, original_max_position_embeddings=256,
                                    max_position_embeddings=4096)
    oracle = tiny_phi3v.Oracle(d)
    llm = make_llm(d, max_model_len=1024)
    text = prompt("Describe the picture.", 1)
    assert len(oracle.prompt_ids(text, [IMG_A])) > 256
    out = llm.generate({"prompt": text, **mm([IMG_A])}, GREEDY)[0]
    assert out.outputs[0].token_ids == oracle.greedy(text, [IMG_A], MAX_NEW)


def test_phi3_text_checkpoint_matches_hf(tmp_path):
    """``Phi3ForCausalLM`` on its own (transformers' model type, saved by save_pretrained; plain rope)."""
    import transformers

    from tiny_models import hf_greedy, train_tokenizer

    tok = train_tokenizer(tmp_path, "llama")
    config = transformers.Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     initializer_range=0.2, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.Phi3ForCausalLM(config).save_pretrained(tmp_path)
    gen = transformers.GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    gen.save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path), dtype="float32", device="cpu", max_model_len=512)
    texts = ["The capital of France is", "A much longer sentence about the sea and the sky."]
    prompts = [tok(t).input_ids for t in texts]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(tmp_path, prompts, MAX_NEW)
