"""Qwen2-VL through the whole engine (LLM / AsyncLLM) against HF transformers ``generate``.

Greedy outputs must equal HF token for token on a tiny random-weight checkpoint (fp32, CPU):
text only, one image, several images of mixed sizes, precomputed image embeddings (computed
with HF's own vision tower), a batch mixing all of these, prefix-cache hits (and the absence of
hits on blocks holding a different image), the encoder cache, chunked prefill cutting through
an image, preemption, and the input errors (limit_mm_per_prompt, corrupt images, placeholder
count mismatches, video URLs without a decoder) — in the offline and the async engine.

The equality tests run at two weight scales (``weight_scale``: the builder's tiny init and HF's
init at std 0.2, where vision features and positions move the logits far more); the tests that
check no fidelity (errors, caches, lifecycle) run at the tiny one (``tiny_only``).

One LLM per configuration (module-scoped), small images and short outputs keep this quick.
"""

from __future__ import annotations

import asyncio
import io

import pytest

import tiny_vlm
from tiny_vlm import hf_image_embeds, make_prompt, mm
from weight_scale import build_at_scale, tiny_only
from engine import EngineArgs, LLM, SamplingParams

BLOCK_SIZE = 16
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
SYSTEM = "You are a careful assistant. You look at every picture closely and then answer briefly and precisely."


def _img(h: int, w: int, seed: int):
    return tiny_vlm.random_image(h, w, seed)


# Grids (t, h, w) with min_pixels 56*56, max_pixels 28*28*64, merge 2 -> LM tokens:
IMG_A = _img(100, 150, 1)  # 1x8x10 -> 20 tokens
IMG_SMALL = _img(56, 56, 2)  # 1x4x4 -> 4 tokens
IMG_WIDE = _img(60, 300, 3)  # 1x4x22 -> 22 tokens
IMG_BIG = _img(200, 250, 4)  # 1x14x18 -> 63 tokens


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, scale):
    return build_at_scale(tiny_vlm.build_tiny_qwen2_vl, tmp_path_factory.mktemp(f"tiny_qwen2_vl_engine_{scale}"),
                          scale, seed=0)


@pytest.fixture(scope="module")
def hf(vlm_dir):
    return tiny_vlm.load_hf_qwen2_vl(vlm_dir)


@pytest.fixture(scope="module")
def image_processor(vlm_dir):
    return tiny_vlm.load_image_processor(vlm_dir)


@pytest.fixture(scope="module")
def llm(vlm_dir):
    return LLM(str(vlm_dir), dtype="float32", device="cpu", max_model_len=1024, max_num_seqs=16)


@pytest.fixture(scope="module")
def ref(hf, image_processor, llm):
    """ref(prompt_text, images) -> (expected expanded prompt ids, HF greedy continuation), cached."""
    return tiny_vlm.hf_greedy_reference(hf, image_processor, llm.get_tokenizer(), MAX_TOKENS)


def assert_matches(out, ref, text: str, images: list | None = None) -> None:
    ids, expected = ref(text, images)
    assert out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == expected
    assert len(expected) > 0


def assert_nothing_queued(llm) -> None:
    sched = llm.core.scheduler
    assert not sched.waiting and not sched.running
    assert not llm.core.has_unfinished()
    assert not llm.output_processor.requests


def image_offsets(ids: list[int], image_token: int) -> list[int]:
    return [i for i, t in enumerate(ids) if t == image_token and (i == 0 or ids[i - 1] != image_token)]


class VisionCalls:
    """Counts items run through the vision tower (wraps ``embed_multimodal`` and the batched form)."""

    def __init__(self, monkeypatch, model) -> None:
        self.calls: list[str] = []
        orig = model.embed_multimodal
        orig_batch = model.embed_multimodal_batch

        def wrapped(modality, data):
            self.calls.append(modality)
            return orig(modality, data)

        def wrapped_batch(modality, items):
            self.calls.extend([modality] * len(items))
            return orig_batch(modality, items)

        monkeypatch.setattr(model, "embed_multimodal", wrapped)
        monkeypatch.setattr(model, "embed_multimodal_batch", wrapped_batch)


# ---------------------------------------------------------------------------------------------
# Equality with HF
# ---------------------------------------------------------------------------------------------


def test_text_only_equals_hf(llm, ref):
    text = make_prompt(0, "Tell me a short story about a cat.")
    outs = llm.generate([text, {"prompt": text}], GREEDY, use_tqdm=False)
    for out in outs:
        assert_matches(out, ref, text)


def test_one_image_equals_hf(llm, ref, hf):
    text = make_prompt(1)
    out = llm.generate(mm(text, IMG_A), GREEDY, use_tqdm=False)[0]
    assert_matches(out, ref, text, [IMG_A])
    # The same request given as token ids: one placeholder, or the run already expanded.
    ids, expected = ref(text, [IMG_A])
    tok = llm.get_tokenizer()
    outs = llm.generate(
        [
            {"prompt_token_ids": tok(text).input_ids, "multi_modal_data": {"image": IMG_A}},
            {"prompt_token_ids": ids, "multi_modal_data": {"image": [IMG_A]}},
        ],
        GREEDY,
        use_tqdm=False,
    )
    for o in outs:
        assert o.prompt_token_ids == ids
        assert o.outputs[0].token_ids == expected


def test_three_mixed_size_images_equal_hf(llm, ref):
    text = make_prompt(3, "Compare the three pictures.")
    images = [IMG_WIDE, IMG_SMALL, IMG_A]
    out = llm.generate(mm(text, images), GREEDY, use_tqdm=False)[0]
    assert_matches(out, ref, text, images)
    ids = out.prompt_token_ids
    assert ids.count(llm.config.model.hf_config.image_token_id) == 22 + 4 + 20


def test_image_embeds_input_equals_pil_path(llm, ref, hf, image_processor):
    text = make_prompt(1, "What do you see here?")
    embeds, grid = hf_image_embeds(hf, image_processor, IMG_WIDE)
    assert embeds.shape == (22, hf.config.text_config.hidden_size)
    outs = llm.generate(
        [mm(text, IMG_WIDE), mm(text, {"image_embeds": embeds, "image_grid_thw": grid})], GREEDY, use_tqdm=False
    )
    pil_out, emb_out = outs
    assert_matches(pil_out, ref, text, [IMG_WIDE])
    assert emb_out.prompt_token_ids == pil_out.prompt_token_ids
    assert emb_out.outputs[0].token_ids == pil_out.outputs[0].token_ids


def test_mixed_batch_equals_hf(llm, ref, hf, image_processor):
    b1, b2, b3, b4 = _img(90, 120, 41), _img(56, 84, 42), _img(150, 100, 43), _img(70, 70, 44)
    embeds, grid = hf_image_embeds(hf, image_processor, b4)
    t_text = make_prompt(0, "Count from one to ten.")
    t_one = make_prompt(1, "Batch: what is in the image?")
    t_three = make_prompt(3, "Batch: describe all of them.")
    t_emb = make_prompt(1, "Batch: embeddings given.")
    t_twice = make_prompt(2, "Batch: the same picture twice.")
    cases = [
        (t_one, [b1]),
        (t_text, []),
        (t_three, [b2, b3, b1]),
        (t_emb, None),  # embeddings of b4
        (t_twice, [b3, b3]),
        (t_one, [b2]),
    ]
    prompts = [
        mm(t, {"image_embeds": embeds, "image_grid_thw": grid}) if imgs is None else (mm(t, imgs) if imgs else t)
        for t, imgs in cases
    ]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert len(outs) == len(cases)
    for out, (t, imgs) in zip(outs, cases):
        assert_matches(out, ref, t, [b4] if imgs is None else imgs)


# ---------------------------------------------------------------------------------------------
# Prefix cache and encoder cache
# ---------------------------------------------------------------------------------------------


def test_prefix_cache_hit_same_image(llm, ref):
    img = _img(100, 150, 11)
    text = make_prompt(1, "What is shown in this picture?", system=SYSTEM)
    bm = llm.core.block_manager
    first = llm.generate(mm(text, img), GREEDY, use_tqdm=False)[0]
    hits_before = bm.num_hit_tokens
    second = llm.generate(mm(text, img), GREEDY, use_tqdm=False)[0]
    assert second.num_cached_tokens > 0
    assert bm.num_hit_tokens - hits_before == second.num_cached_tokens
    # Same image and text: the blocks holding the image tokens are reused too.
    image_token = llm.config.model.hf_config.image_token_id
    end = max(i for i, t in enumerate(second.prompt_token_ids) if t == image_token) + 1
    assert second.num_cached_tokens >= end // BLOCK_SIZE * BLOCK_SIZE > image_offsets(second.prompt_token_ids, image_token)[0]
    assert second.num_cached_tokens < len(second.prompt_token_ids)
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert_matches(second, ref, text, [img])


def test_different_image_same_text_no_hit_on_image_blocks(llm, ref):
    img1, img2 = _img(100, 150, 21), _img(100, 150, 22)  # same size: identical token ids
    text = make_prompt(1, "Which colours dominate?", system=SYSTEM)
    bm = llm.core.block_manager
    out1 = llm.generate(mm(text, img1), GREEDY, use_tqdm=False)[0]
    hits_before = bm.num_hit_tokens
    out2 = llm.generate(mm(text, img2), GREEDY, use_tqdm=False)[0]
    assert out1.prompt_token_ids == out2.prompt_token_ids
    offset = image_offsets(out2.prompt_token_ids, llm.config.model.hf_config.image_token_id)[0]
    assert offset >= BLOCK_SIZE  # the system prompt fills at least one text-only block
    # Text-only blocks before the image may be shared; no block holding an image token may be.
    assert 0 < out2.num_cached_tokens <= offset // BLOCK_SIZE * BLOCK_SIZE
    assert bm.num_hit_tokens - hits_before == out2.num_cached_tokens
    assert out1.outputs[0].token_ids != out2.outputs[0].token_ids
    assert_matches(out1, ref, text, [img1])
    assert_matches(out2, ref, text, [img2])


@tiny_only
def test_encoder_cache_encodes_an_image_once_across_requests(llm, ref, monkeypatch):
    img = _img(80, 120, 31)
    runner = llm.core.runner
    vision = VisionCalls(monkeypatch, runner.model)
    ec = runner.encoder_cache
    hits0, misses0 = ec.hits, ec.misses
    # Different text before the image, so that the prefix cache cannot cover the image tokens.
    texts = [make_prompt(1, f"Question {i}: what is it?", system=f"Session number {i}.") for i in range(3)]
    first = llm.generate(mm(texts[0], img), GREEDY, use_tqdm=False)[0]
    assert vision.calls == ["image"]
    assert ec.misses - misses0 == 1
    rest = llm.generate([mm(texts[1], img), mm(texts[2], [img])], GREEDY, use_tqdm=False)
    assert vision.calls == ["image"]  # not run again: same content, same cache entry
    assert ec.misses - misses0 == 1
    assert ec.hits - hits0 >= 2
    for out, text in zip([first, *rest], texts):
        assert out.num_cached_tokens == 0
        assert_matches(out, ref, text, [img])


# ---------------------------------------------------------------------------------------------
# Chunked prefill, preemption
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chunked_llm(vlm_dir):
    return LLM(str(vlm_dir), dtype="float32", device="cpu", max_model_len=512, max_num_seqs=8,
               max_num_batched_tokens=16)


def test_chunked_prefill_through_image_tokens_equals_hf(chunked_llm, ref, monkeypatch):
    llm = chunked_llm
    runner = llm.core.runner
    vision = VisionCalls(monkeypatch, runner.model)
    steps = []
    orig_prepare = runner.prepare

    chained_image_chunks = []

    def prepare(out, prev=None):
        batch = orig_prepare(out, prev)
        steps.append((batch.input_ids.numel(), [(rid, f.identifier, lo, hi) for rid, f, lo, hi, _ in batch.mm_slices]))
        if prev is not None and batch.mm_slices:
            chained_image_chunks.append(len(steps))
        return batch

    monkeypatch.setattr(runner, "prepare", prepare)
    t_big = make_prompt(1, "Describe the large picture in detail.")
    t_three = make_prompt(3, "And these three?")
    images_three = [IMG_SMALL, IMG_A, IMG_WIDE]
    outs = llm.generate([mm(t_big, IMG_BIG), mm(t_three, images_three)], GREEDY, use_tqdm=False)
    assert_matches(outs[0], ref, t_big, [IMG_BIG])
    assert_matches(outs[1], ref, t_three, images_three)

    assert all(n <= 16 for n, _ in steps)
    # The 63-token image run of the first request was cut into several chunks that tile it exactly.
    rid0 = outs[0].request_id
    big = [(lo, hi) for n, slices in steps for rid, _, lo, hi in slices if rid == rid0]
    assert len(big) >= 4
    assert big[0][0] == 0 and big[-1][1] == 63
    assert all(a[1] == b[0] for a, b in zip(big, big[1:]))
    # ...but the vision tower ran once per image, not once per chunk.
    assert len(vision.calls) == 4
    # Async scheduling (on by default) launched image chunks chained to the step in flight.
    assert chained_image_chunks


@pytest.fixture(scope="module")
def preempt_llm(vlm_dir):
    # 9 usable blocks of 16 tokens: two 59-token image prompts (4 blocks each) are admitted, and
    # both need a 5th block after 5 decode steps, so the newer one is preempted (and recomputed).
    return LLM(str(vlm_dir), dtype="float32", device="cpu", max_model_len=144, max_num_seqs=8,
               num_gpu_blocks_override=10)


def test_preemption_with_images_equals_hf(preempt_llm, ref):
    llm = preempt_llm
    images = [_img(100, 150, 51 + i) for i in range(4)]
    text = make_prompt(1, "Describe this image, please. Mention colours.")
    assert len(ref(text, [images[0]])[0]) == 59
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([mm(text, im) for im in images], params, use_tqdm=False)
    assert llm.core.scheduler.num_preemptions > 0
    for out, im in zip(outs, images):
        ids, expected = ref(text, [im])
        assert out.prompt_token_ids == ids
        # ignore_eos: HF may stop at eos earlier; the common prefix must agree.
        assert out.outputs[0].token_ids[: len(expected)] == expected
    assert_nothing_queued(llm)
    assert llm.core.block_manager.num_free_blocks == llm.core.block_manager.num_usable_blocks


# ---------------------------------------------------------------------------------------------
# Input errors
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_llm(vlm_dir):
    return LLM(str(vlm_dir), dtype="float32", device="cpu", max_model_len=512, max_num_seqs=4,
               limit_mm_per_prompt={"image": 2})


@tiny_only
def test_limit_mm_per_prompt(limited_llm, ref):
    llm = limited_llm
    good = mm(make_prompt(1), IMG_A)
    too_many = mm(make_prompt(3), [IMG_A, IMG_SMALL, IMG_WIDE])
    with pytest.raises(ValueError, match="limit_mm_per_prompt"):
        llm.generate([good, too_many], GREEDY, use_tqdm=False)
    assert_nothing_queued(llm)
    # Two images are within the limit.
    text = make_prompt(2, "Two pictures.")
    out = llm.generate(mm(text, [IMG_SMALL, IMG_A]), GREEDY, use_tqdm=False)[0]
    assert_matches(out, ref, text, [IMG_SMALL, IMG_A])


def corrupt_image():
    """A PNG cut in half: PIL opens it (the header is intact) and fails only when pixels load."""
    from PIL import Image

    buf = io.BytesIO()
    _img(100, 150, 99).save(buf, format="PNG")
    data = buf.getvalue()
    img = Image.open(io.BytesIO(data[: len(data) // 2]))
    assert img.size == (150, 100)
    return img


@tiny_only
def test_corrupt_image_raises_value_error_naming_item(llm, ref):
    good_text = make_prompt(1, "A fine picture.")
    bad = mm(make_prompt(2), [IMG_A, corrupt_image()])
    with pytest.raises(ValueError, match=r"image 1"):
        llm.generate([mm(good_text, IMG_SMALL), bad], GREEDY, use_tqdm=False)
    assert_nothing_queued(llm)
    out = llm.generate(mm(good_text, IMG_SMALL), GREEDY, use_tqdm=False)[0]  # the engine still works
    assert_matches(out, ref, good_text, [IMG_SMALL])


@tiny_only
def test_placeholder_count_mismatch_raises(llm, hf, image_processor):
    cases = [
        mm(make_prompt(2), [IMG_A]),  # two placeholders, one image
        mm(make_prompt(1), [IMG_A, IMG_SMALL]),  # one placeholder, two images
        mm(make_prompt(0, "No placeholder at all."), IMG_A),  # an image but no placeholder
    ]
    for prompt in cases:
        with pytest.raises(ValueError, match="placeholder"):
            llm.generate(prompt, GREEDY, use_tqdm=False)
    # Embeddings whose row count disagrees with their grid.
    embeds, grid = hf_image_embeds(hf, image_processor, IMG_SMALL)
    with pytest.raises(ValueError, match="image_embeds"):
        llm.generate(mm(make_prompt(1), {"image_embeds": embeds[:-1], "image_grid_thw": grid}), GREEDY,
                     use_tqdm=False)
    assert_nothing_queued(llm)


@tiny_only
def test_video_url_without_a_decoder_says_what_to_send(llm, monkeypatch):
    # Video URLs need PyAV (tests/test_video_url.py); without it the error says what to send
    # instead, before anything is fetched (the URL's host does not exist).
    from engine import video_decode

    monkeypatch.setattr(video_decode, "available", lambda: False)
    messages = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "https://video-host.invalid/clip.mp4"}},
        {"type": "text", "text": "What happens?"},
    ]}]
    with pytest.raises(ValueError, match=r"content\[0\]\.video_url: .*PyAV is not installed.*image_url parts"):
        llm.chat(messages, GREEDY, use_tqdm=False)
    assert_nothing_queued(llm)


# ---------------------------------------------------------------------------------------------
# Async engine
# ---------------------------------------------------------------------------------------------


@tiny_only
def test_async_corrupt_image_fails_alone(vlm_dir, ref):
    from engine.async_llm import AsyncLLM

    eng = AsyncLLM(EngineArgs(model=str(vlm_dir), dtype="float32", device="cpu", max_model_len=512, max_num_seqs=8))
    try:
        t1 = make_prompt(1, "Async: describe.")
        t2 = make_prompt(2, "Async: compare.")

        async def collect(prompt, rid):
            last = None
            async for out in eng.generate(prompt, GREEDY, rid):
                last = out
            return last

        async def main():
            return await asyncio.gather(
                collect(mm(t1, IMG_A), "good-1"),
                collect(mm(make_prompt(1), corrupt_image()), "bad"),
                collect(mm(t2, [IMG_WIDE, IMG_SMALL]), "good-2"),
                return_exceptions=True,
            )

        good1, bad, good2 = asyncio.run(main())
        assert isinstance(bad, ValueError), bad
        assert "image 0" in str(bad)
        assert not isinstance(good1, BaseException), good1
        assert not isinstance(good2, BaseException), good2
        assert good1.finished and good2.finished
        assert_matches(good1, ref, t1, [IMG_A])
        assert_matches(good2, ref, t2, [IMG_WIDE, IMG_SMALL])
        assert eng.num_unfinished() == 0
        assert eng.is_running
    finally:
        eng.shutdown()


@tiny_only
def test_engine_is_freed_without_the_cyclic_collector(vlm_dir):
    """Objects alive at engine start are frozen out of the cyclic GC (engine_core.freeze_heap), so
    an engine dropped later must be freed by reference counting alone: no reference cycles, or
    its weights (and on a GPU, its KV cache) would stay allocated after ``del``."""
    import gc
    import weakref

    llm = LLM(str(vlm_dir), dtype="float32", device="cpu", max_model_len=1024, max_num_seqs=4)
    llm.generate(mm(make_prompt(1), [IMG_A]), GREEDY)
    refs = [weakref.ref(o) for o in (llm, llm.core, llm.core.runner, llm.core.runner.model,
                                     next(llm.core.runner.model.parameters()))]
    gc.disable()  # only reference counting may free them
    try:
        del llm
        assert [r() is None for r in refs] == [True] * len(refs)
    finally:
        gc.enable()
