"""The engine on a CUDA GPU equals HF transformers (CPU, fp32) token for token on the tiny models.

Skips where there is no CUDA device (CI has none); run on the lent H100 through the device tool.
The MLU path cannot be exercised here: there is no MLU hardware.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MAX_TOKENS = 16


def _prompts(tok):
    texts = ["Hello there", "The quick brown fox jumps over the lazy dog " * 6, "a b c d e f g", "Numbers: 1 2 3 4 5"]
    return [tok(t).input_ids for t in texts]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_gqa", "tiny_qwen2"])
def test_text_models_on_cuda_equal_hf(fixture, request):
    import tiny_models

    from engine import LLM, SamplingParams

    model_dir = request.getfixturevalue(fixture)
    llm = LLM(str(model_dir), dtype="float32", device="cuda", max_model_len=512, gpu_memory_utilization=0.3)
    assert llm.config.platform.type == "cuda"
    ids = _prompts(llm.get_tokenizer())
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                        use_tqdm=False)
    expected = tiny_models.hf_greedy(model_dir, ids, MAX_TOKENS)
    assert [o.outputs[0].token_ids for o in outs] == expected
    # chunked prefill + prefix hits on the GPU as well
    llm2 = LLM(str(model_dir), dtype="float32", device="cuda", max_model_len=512, max_num_batched_tokens=16,
               gpu_memory_utilization=0.3)
    outs2 = llm2.generate([{"prompt_token_ids": p} for p in ids + ids], SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                          use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs2] == expected + expected
    assert llm2.core.block_manager.num_hit_tokens > 0


def test_bf16_on_cuda_runs_and_mostly_agrees(tiny_qwen2):
    import tiny_models

    from engine import LLM, SamplingParams

    llm = LLM(str(tiny_qwen2), dtype="bfloat16", device="cuda", max_model_len=512, gpu_memory_utilization=0.3)
    ids = _prompts(llm.get_tokenizer())
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                        use_tqdm=False)
    expected = tiny_models.hf_greedy(tiny_qwen2, ids, MAX_TOKENS)
    # bf16 rounding flips near-ties, so compare only the first tokens (before any divergence compounds)
    first = [o.outputs[0].token_ids[0] for o in outs]
    assert sum(f == e[0] for f, e in zip(first, expected)) >= len(ids) - 1


def test_qwen2_vl_image_on_cuda_equals_hf(tmp_path_factory):
    import tiny_vlm

    from engine import LLM, SamplingParams

    d = tiny_vlm.build_tiny_qwen2_vl(tmp_path_factory.mktemp("gpu_qwen2_vl"))
    hf = tiny_vlm.load_hf_qwen2_vl(d)
    ip = tiny_vlm.load_image_processor(d)
    llm = LLM(str(d), dtype="float32", device="cuda", max_model_len=1024, gpu_memory_utilization=0.3)
    runner = llm.core.runner
    assert runner.prefill_graphs is not None  # the single-image prompt's prefill replays a graph
    used = []
    orig_run = runner.prefill_graphs.run
    runner.prefill_graphs.run = lambda *a: used.append(1) or orig_run(*a)
    img = tiny_vlm.random_image(100, 150, 1)
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n"
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": img}},
                       SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    o = ip(images=[img], return_tensors="pt")
    mm = torch.tensor([[int(t == hf.config.image_token_id) for t in ids]])
    inp = torch.tensor([ids])
    with torch.no_grad():
        g = hf.generate(input_ids=inp, attention_mask=torch.ones_like(inp), do_sample=False, max_new_tokens=MAX_TOKENS,
                        pixel_values=o["pixel_values"], image_grid_thw=o["image_grid_thw"], mm_token_type_ids=mm)
    assert out.outputs[0].token_ids == g[0, len(ids):].tolist()
    assert used
    # the one-image vision pass was captured as a CUDA graph (and replayed: the output above)
    vis = runner.model.visual_runner
    assert vis is not None and vis.graphs and all(entry is not None for entry in vis.graphs.values())


def test_vision_pass_replays_chunk_graphs(tmp_path_factory):
    """A vision pass bigger than EncoderGraphCache.max_patches is cut into runs of same-grid
    images of at most chunk_patches patches, each replaying its (grid, count) graph: the output
    equals the eager tower's over the whole pass, with an image bigger than a chunk (eager) in
    the middle."""
    import tiny_vlm

    from engine import LLM

    d = tiny_vlm.build_tiny_qwen2_vl(tmp_path_factory.mktemp("gpu_qwen2_vl_chunks"))
    llm = LLM(str(d), dtype="float32", device="cuda", max_model_len=1024, gpu_memory_utilization=0.3)
    model = llm.core.runner.model
    vis = model.visual_runner
    ip = tiny_vlm.load_image_processor(d)
    imgs = [tiny_vlm.random_image(56, 84, s) for s in range(5)] + [tiny_vlm.random_image(100, 150, 9),
                                                                     tiny_vlm.random_image(56, 84, 7)]
    o = ip(images=imgs, return_tensors="pt")
    pv, grid = o["pixel_values"].cuda(), o["image_grid_thw"].tolist()
    per = grid[0][0] * grid[0][1] * grid[0][2]
    vis.max_patches, vis.chunk_patches = per, 2 * per  # 5 same-size images: chunks of 2, 2, 1
    vis.graphs.clear()
    with torch.inference_mode():
        got = vis(pv, grid)
        ref = model.visual(pv, grid)
        again = vis(pv, grid)  # replays only
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, again)
    g0, g1 = tuple(grid[0]), tuple(grid[5])
    assert g1[0] * g1[1] * g1[2] > vis.chunk_patches  # the big image ran eagerly
    assert set(vis.graphs) == {(g0, g0), (g0,)}
    assert all(entry is not None for entry in vis.graphs.values())


def test_vision_graphs_recapture_after_clear(tmp_path_factory):
    """EncoderGraphCache.clear() drops the graphs and their pool: passes captured afterwards
    replay graphs again (none falls back to eager) and equal the eager tower."""
    import tiny_vlm

    from engine import LLM

    d = tiny_vlm.build_tiny_qwen2_vl(tmp_path_factory.mktemp("gpu_qwen2_vl_clear"))
    llm = LLM(str(d), dtype="float32", device="cuda", max_model_len=1024, gpu_memory_utilization=0.3)
    model = llm.core.runner.model
    vis = model.visual_runner
    ip = tiny_vlm.load_image_processor(d)
    with torch.inference_mode():
        for round_ in range(3):
            imgs = [tiny_vlm.random_image(56 + 28 * round_, 84, s) for s in range(2)]
            o = ip(images=imgs, return_tensors="pt")
            pv, grid = o["pixel_values"].cuda(), o["image_grid_thw"].tolist()
            got = vis(pv, grid)
            torch.testing.assert_close(got, model.visual(pv, grid), rtol=1e-5, atol=1e-5)
            assert len(vis.graphs) == 1 and all(entry is not None for entry in vis.graphs.values())
            vis.clear()
            assert not vis.graphs and vis.pool is None


@pytest.mark.parametrize("fixture", ["tiny_llama_gqa", "tiny_qwen2"])
def test_cuda_graphs_decode_equals_hf_and_eager(fixture, request):
    """Decode-only steps replay CUDA graphs (padded batch sizes: 3 -> 4, 5 -> 8); greedy tokens
    equal HF's with graphs on and with enforce_eager=True."""
    import tiny_models

    from engine import LLM, SamplingParams

    model_dir = request.getfixturevalue(fixture)
    texts = ["Hello there", "The quick brown fox jumps over the lazy dog " * 6, "a b c d e f g",
             "Numbers: 1 2 3 4 5", "zebra crossing at noon"]
    for eager in (False, True):
        llm = LLM(str(model_dir), dtype="float32", device="cuda", max_model_len=512, max_num_seqs=16,
                  gpu_memory_utilization=0.3, enforce_eager=eager)
        graphs = llm.core.runner.cuda_graphs
        if eager:
            assert graphs is None
        else:
            assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 16]
            replays = []
            orig_run = graphs.run

            def counted(input_ids, positions, meta, replays=replays, orig_run=orig_run):
                replays.append(input_ids.shape[0])
                return orig_run(input_ids, positions, meta)
            graphs.run = counted
        tok = llm.get_tokenizer()
        for k in (3, 5):
            ids = [tok(t).input_ids for t in texts[:k]]
            outs = llm.generate([{"prompt_token_ids": p} for p in ids],
                                SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
            expected = tiny_models.hf_greedy(model_dir, ids, MAX_TOKENS)
            assert [o.outputs[0].token_ids for o in outs] == expected, (eager, k)
        if not eager:
            assert 3 in replays and 5 in replays  # padded to the 4 and 8 graphs


@pytest.mark.parametrize("fixture", ["tiny_llama_gqa", "tiny_qwen2"])
def test_prefill_graphs_equal_hf(fixture, request):
    """One prompt at a time: each prefill chunk replays a padded prefill graph (sizes 128..1024),
    the second chunk of a chunked prompt over its cached first chunk too; a batch of two prompts
    prefills eagerly. Greedy tokens equal HF's either way."""
    import tiny_models

    from engine import LLM, SamplingParams

    model_dir = request.getfixturevalue(fixture)
    llm = LLM(str(model_dir), dtype="float32", device="cuda", max_model_len=1024, max_num_seqs=4,
              max_num_batched_tokens=512, gpu_memory_utilization=0.3)
    graphs = llm.core.runner.prefill_graphs
    assert graphs is not None and graphs.sizes == [128, 256, 512, 1024]
    replays = []
    orig_run = graphs.run

    def counted(embeds, positions, meta):
        replays.append(embeds.shape[0])
        return orig_run(embeds, positions, meta)
    graphs.run = counted
    tok = llm.get_tokenizer()
    rng = torch.Generator().manual_seed(0)
    vocab = tok.vocab_size
    prompts = [tok("Hello there").input_ids, tok("The quick brown fox jumps over the lazy dog " * 20).input_ids,
               torch.randint(10, vocab, (700,), generator=rng).tolist()]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    for ids in prompts:
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == tiny_models.hf_greedy(model_dir, [ids], MAX_TOKENS)[0], len(ids)
    assert replays == [len(prompts[0]), len(prompts[1]), 512, 700 - 512]
    replays.clear()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == tiny_models.hf_greedy(model_dir, prompts[:2], MAX_TOKENS)
    assert replays == []  # two sequences in one step: eager


def test_dropped_engine_frees_the_gpu(tmp_path_factory):
    """The heap is frozen out of the cyclic GC at engine start (engine_core.freeze_heap): an engine
    with every kind of CUDA graph captured must still be freed by reference counting alone, its
    KV cache and weights released on ``del``. Torch keeps a cuBLAS workspace (32 MiB on Hopper)
    for each (handle, stream) it ran a GEMM on, for the process; the first run of this test on an
    H200 found exactly that left over, so the workspaces are cleared before each reading. Two
    engines in turn, each must leave allocated memory where it found it."""
    import gc
    import weakref

    import tiny_vlm

    from engine import LLM, SamplingParams

    d = tiny_vlm.build_tiny_qwen2_vl(tmp_path_factory.mktemp("gpu_qwen2_vl_free"))
    img = tiny_vlm.random_image(100, 150, 1)
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n"

    def allocated() -> int:
        torch.cuda.synchronize()
        torch._C._cuda_clearCublasWorkspaces()
        return torch.cuda.memory_allocated()

    for _ in range(2):
        base = allocated()
        llm = LLM(str(d), dtype="float32", device="cuda", max_model_len=1024, gpu_memory_utilization=0.3)
        llm.generate([{"prompt": prompt, "multi_modal_data": {"image": img}}] * 3 + ["Hello there"],
                     SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
        held = allocated() - base
        kv_bytes = sum(t.numel() * t.element_size() for t in llm.core.runner.kv_caches)
        assert held >= kv_bytes > 0
        refs = [weakref.ref(o) for o in (llm, llm.core.runner, llm.core.runner.model)]
        gc.disable()  # only reference counting may free it
        try:
            del llm
            assert [r() is None for r in refs] == [True] * len(refs)
            left = allocated() - base
        finally:
            gc.enable()
        assert left < held / 100, f"{left} of {held} bytes still allocated"
