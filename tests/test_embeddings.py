"""Offline embeddings (``LLM(task="embed").embed``) against an independent Hugging Face computation:
the last layer's hidden state (after the final norm) of the last token (or the mean over the
prompt), L2-normalised. Covers batches of different lengths, chunked prefill, preemption, prefix
caching, matryoshka ``dimensions``, task mismatches, NaN outputs and a Qwen2-VL image prompt."""

from __future__ import annotations

import math

import pytest
import tiny_models
import torch

from engine import LLM, PoolingParams, SamplingParams
from engine.outputs import EngineOutputError

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    ("Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 3.14 2.718 and more numbers to make it long, "
     "longer than one block of sixteen tokens, so that chunks split it several times."),
    "A",
    "She sells sea shells by the sea shore. " * 4,
]
TOL = 1e-5
KW = {"dtype": "float32", "device": "cpu", "max_model_len": 512, "max_num_seqs": 8}


@torch.no_grad()
def hf_embed(model_dir, ids: list[int], pooling: str = "LAST", normalize: bool = True, dims: int | None = None):
    base = tiny_models.load_hf_model(model_dir).model  # the decoder without the LM head
    hidden = base(torch.tensor([ids])).last_hidden_state[0].float()  # after the final norm
    vec = hidden[-1] if pooling == "LAST" else hidden.mean(0) if pooling == "MEAN" else hidden[0]
    if dims is not None:
        vec = vec[:dims]
    return torch.nn.functional.normalize(vec, dim=-1) if normalize else vec


def _close(got: list[float], want: torch.Tensor) -> None:
    got_t = torch.tensor(got)
    assert got_t.shape == want.shape
    assert torch.allclose(got_t, want, atol=TOL, rtol=0), (got_t - want).abs().max()


@pytest.fixture(scope="module", params=["tiny_qwen2", "tiny_llama", "tiny_qwen2_large"])
def model_dir(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), task="embed", **KW)


def test_last_pooling_batch_equals_hf(llm, model_dir):
    outs = llm.embed(TEXTS, use_tqdm=False)
    tok = llm.get_tokenizer()
    assert [o.request_id for o in outs] == sorted((o.request_id for o in outs), key=int)
    for text, out in zip(TEXTS, outs):
        ids = tok(text).input_ids
        assert out.prompt_token_ids == ids and out.finished and out.prompt == text
        _close(out.outputs.embedding, hf_embed(model_dir, ids))
        assert math.isclose(sum(x * x for x in out.outputs.embedding), 1.0, rel_tol=1e-5)
        assert out.outputs.hidden_size == 64
    # Single prompt, token-id prompt, encode alias, and prefix-cache hits on a repeat: the same.
    again = llm.encode({"prompt_token_ids": outs[2].prompt_token_ids}, use_tqdm=False)[0]
    _close(again.outputs.embedding, torch.tensor(outs[2].outputs.embedding))
    assert again.num_cached_tokens > 0  # LAST pooling may reuse cached KV: the last token is recomputed
    assert not llm.output_processor.pooling and not llm.core.has_unfinished()
    bm = llm.core.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks


def test_dimensions_and_no_normalize(llm, model_dir):
    ids = llm.get_tokenizer()(TEXTS[1]).input_ids
    params = [PoolingParams(dimensions=16), PoolingParams(normalize=False), PoolingParams(normalize=False, dimensions=8)]
    outs = llm.embed([TEXTS[1]] * 3, params, use_tqdm=False)
    _close(outs[0].outputs.embedding, hf_embed(model_dir, ids, dims=16))
    _close(outs[1].outputs.embedding, hf_embed(model_dir, ids, normalize=False))
    _close(outs[2].outputs.embedding, hf_embed(model_dir, ids, normalize=False, dims=8))
    with pytest.raises(ValueError, match="dimensions"):
        llm.embed("x", PoolingParams(dimensions=65))
    with pytest.raises(ValueError, match="dimensions"):
        PoolingParams(dimensions=0)


def test_task_mismatch(llm, tiny_qwen2):
    with pytest.raises(ValueError, match="embed"):
        llm.generate("hello", SamplingParams(max_tokens=2))
    gen = LLM(str(tiny_qwen2), **KW)
    with pytest.raises(ValueError, match="task='embed'"):
        gen.embed("hello")
    with pytest.raises(ValueError, match="task"):
        LLM(str(tiny_qwen2), task="rerank", **KW)


@pytest.mark.parametrize("pooling", ["LAST", "MEAN", "CLS"])
def test_chunked_prefill_and_pooling_types(tiny_qwen2, pooling):
    # 16-token steps cut the long prompts into chunks (and a request admitted with the budget
    # left after another finished starts mid-step); MEAN accumulates across chunks. A small KV
    # cache (8 blocks: exactly one 116-token prompt) makes requests wait for blocks.
    kw = dict(KW, max_model_len=128)
    llm = LLM(str(tiny_qwen2), task="embedding", pooling_type=pooling.lower(), max_num_batched_tokens=16,
              num_gpu_blocks_override=9, **kw)
    tok = llm.get_tokenizer()
    texts = TEXTS + [TEXTS[2]]  # a repeat: MEAN / CLS must not take prefix-cache hits
    outs = llm.embed(texts, use_tqdm=False)
    for text, out in zip(texts, outs):
        _close(out.outputs.embedding, hf_embed(tiny_qwen2, tok(text).input_ids, pooling))
    if pooling != "LAST":
        assert outs[-1].num_cached_tokens == 0


def test_nan_embedding_raises(tiny_qwen2):
    llm = LLM(str(tiny_qwen2), task="embed", **KW)
    with torch.no_grad():
        llm.core.runner.model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(EngineOutputError, match="non-finite"):
        llm.embed(["hello", "world"], use_tqdm=False)
    assert not llm.core.has_unfinished()


def _vlm_embed_case(arch: str):
    """(builder, HF loader, image processor loader, prompt with one image placeholder) per VLM."""
    import tiny_llava
    import tiny_vlm
    import tiny_vlm25

    qwen_prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this.<|im_end|>\n"
    return {
        "qwen2_vl": (tiny_vlm.build_tiny_qwen2_vl, tiny_vlm.load_hf_qwen2_vl, tiny_vlm.load_image_processor,
                     qwen_prompt),
        "qwen2_5_vl": (tiny_vlm25.build_tiny_qwen2_5_vl, tiny_vlm25.load_hf_qwen2_5_vl,
                       tiny_vlm25.load_image_processor, qwen_prompt),
        "llava": (tiny_llava.build_tiny_llava, tiny_llava.load_hf_llava, tiny_llava.load_image_processor,
                  "USER: <image>\nDescribe this. ASSISTANT:"),
    }[arch]


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "llava"])
def test_vlm_image_prompt_embedding_equals_hf(tmp_path_factory, arch, scale):
    """An image prompt's last-token embedding (task="embed") equals HF's last hidden state there,
    normalized, for each VLM family at both weight scales."""
    import tiny_vlm
    from weight_scale import build_at_scale

    build, load_hf, load_processor, prompt = _vlm_embed_case(arch)
    vlm_dir = build_at_scale(build, tmp_path_factory.mktemp(f"embed_{arch}_{scale}"), scale, seed=0)
    llm = LLM(str(vlm_dir), task="embed", **KW)
    image = tiny_vlm.random_image(100, 150, 1)
    out = llm.embed({"prompt": prompt, "multi_modal_data": {"image": [image]}}, use_tqdm=False)[0]

    hf = load_hf(vlm_dir)
    o = load_processor(vlm_dir)(images=[image], return_tensors="pt")
    image_token = hf.config.image_token_id
    ids = out.prompt_token_ids
    kw = {"pixel_values": o["pixel_values"]}
    if "image_grid_thw" in o:  # Qwen: the grid and M-RoPE's token types
        assert ids.count(image_token) == int(o["image_grid_thw"][0].prod()) // 4
        kw.update(image_grid_thw=o["image_grid_thw"],
                  mm_token_type_ids=torch.tensor([[int(t == image_token) for t in ids]]))
    with torch.no_grad():
        hidden = hf.model(input_ids=torch.tensor([ids]), **kw).last_hidden_state
    _close(out.outputs.embedding, torch.nn.functional.normalize(hidden[0, -1].float(), dim=-1))


def test_async_encode_and_cancel(tiny_qwen2):
    import asyncio

    from engine import EngineArgs
    from engine.async_llm import AsyncLLM

    eng = AsyncLLM(EngineArgs(model=str(tiny_qwen2), task="embed", **KW))
    try:
        async def one(text, rid, params=None):
            outs = [o async for o in eng.encode(text, params, rid)]
            assert len(outs) == 1 and outs[0].finished and outs[0].request_id == rid
            return outs[0]

        async def run():
            outs = await asyncio.gather(*[one(t, f"e{i}") for i, t in enumerate(TEXTS)])
            # Cancelled while queued or running: aborted, nothing is left in the engine.
            task = asyncio.ensure_future(one(TEXTS[2] * 3, "cancelled"))
            await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            with pytest.raises(ValueError, match="embeddings"):
                async for _ in eng.generate("hi", SamplingParams(max_tokens=2), "gen"):
                    pass
            return outs

        outs = asyncio.run(run())
        tok = eng.tokenizer
        for text, out in zip(TEXTS, outs):
            _close(out.outputs.embedding, hf_embed(tiny_qwen2, tok(text).input_ids))
        assert eng.num_unfinished() == 0 and not eng.output_processor.pooling
    finally:
        eng.shutdown()
