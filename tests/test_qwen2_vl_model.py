"""Our Qwen2-VL (engine/models/qwen2_vl.py) against HF transformers on a tiny random checkpoint.

Component level: vision tower (images, several images, video), M-RoPE positions and rotary,
weight loading in both checkpoint layouts, and a full LM prefill + decode step over a paged KV
cache with the torch reference attention backend. All in fp32 on CPU.
"""

from __future__ import annotations

import pytest
import torch

import tiny_vlm
from engine.loader import iterate_weights
from engine.models import get_model_class
from engine.models.qwen2_vl import (
    MRotaryEmbedding,
    Qwen2VLForConditionalGeneration,
    get_mrope_decode_positions,
    get_mrope_positions,
    num_mm_tokens,
)
from kernels import AttentionMetadata, get_backend

BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return tiny_vlm.build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl"), seed=0)


@pytest.fixture(scope="module")
def hf_model(vlm_dir):
    return tiny_vlm.load_hf_qwen2_vl(vlm_dir)


@pytest.fixture(scope="module")
def ours(vlm_dir, hf_model):
    model = Qwen2VLForConditionalGeneration(hf_model.config, get_backend("cpu")).eval()
    loaded = model.load_weights(iterate_weights(vlm_dir))
    assert loaded == {n for n, _ in model.named_parameters()}
    return model


@pytest.fixture(scope="module")
def processor(vlm_dir):
    return tiny_vlm.load_image_processor(vlm_dir)


@pytest.fixture(scope="module")
def tokenizer(vlm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(vlm_dir))


def _token_types(ids: torch.Tensor, config) -> torch.Tensor:
    return (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()


# ---------------------------------------------------------------------------------------------
# Checkpoint, registry, processor
# ---------------------------------------------------------------------------------------------


def test_registry_and_attributes(ours, hf_model):
    assert get_model_class("Qwen2VLForConditionalGeneration") is Qwen2VLForConditionalGeneration
    assert ours.uses_mrope is True
    assert (ours.num_layers, ours.num_kv_heads, ours.head_dim) == (2, 2, 16)
    assert ours.image_token_id == hf_model.config.image_token_id


def test_checkpoint_layout_and_processor(vlm_dir, processor, tokenizer):
    # What save_pretrained writes in transformers 5: the original (4.x) layout.
    names = {n for n, _ in iterate_weights(vlm_dir)}
    assert "visual.patch_embed.proj.weight" in names
    assert "model.layers.0.self_attn.q_proj.bias" in names
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert processor.patch_size == 14 and processor.merge_size == 2 and processor.temporal_patch_size == 2
    for t in tiny_vlm.VISION_TOKENS:
        assert len(tokenizer(t).input_ids) == 1


def test_load_weights_in_memory_layout(ours, hf_model):
    """transformers 5's in-memory names (model.visual.*, model.language_model.*) load the same."""
    other = Qwen2VLForConditionalGeneration(hf_model.config, get_backend("cpu"))
    names = list(hf_model.state_dict())
    assert any(n.startswith("model.language_model.") for n in names)
    assert any(n.startswith("model.visual.") for n in names)
    loaded = other.load_weights(hf_model.state_dict().items())
    assert loaded == {n for n, _ in other.named_parameters()}
    ref = dict(ours.named_parameters())
    for n, p in other.named_parameters():
        torch.testing.assert_close(p, ref[n], rtol=0, atol=0)


def test_unexpected_weight_rejected(hf_model):
    other = Qwen2VLForConditionalGeneration(hf_model.config, get_backend("cpu"))
    with pytest.raises(ValueError, match="unexpected weight"):
        other.load_weights([("visual.no_such.weight", torch.zeros(1))])


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _hf_image_features(hf_model, pixel_values, grid):
    return torch.cat(hf_model.model.get_image_features(pixel_values, grid).pooler_output)


@torch.no_grad()
def test_vision_single_image(ours, hf_model, processor):
    inputs = processor(images=[tiny_vlm.random_image(100, 150, seed=1)], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 10]]
    ref = _hf_image_features(hf_model, inputs["pixel_values"], inputs["image_grid_thw"])
    got = ours.embed_multimodal("image", dict(inputs))
    assert got.shape == (20, 64)
    err = (got - ref).abs().max().item()
    print(f"single image max abs err {err:.3e} (feature max {ref.abs().max():.2f})")
    assert err < 1e-4


@torch.no_grad()
def test_vision_three_images_one_call(ours, hf_model, processor):
    images = [
        tiny_vlm.random_image(100, 150, seed=1),
        tiny_vlm.random_image(56, 56, seed=2),
        tiny_vlm.random_image(90, 200, seed=3),
    ]
    inputs = processor(images=images, return_tensors="pt")
    grids = inputs["image_grid_thw"]
    assert len({tuple(g) for g in grids.tolist()}) == 3
    ref = _hf_image_features(hf_model, inputs["pixel_values"], grids)
    got = ours.embed_multimodal("image", {"pixel_values": inputs["pixel_values"], "image_grid_thw": grids})
    assert got.shape[0] == sum(num_mm_tokens(grids, 2))
    err = (got - ref).abs().max().item()
    print(f"three images max abs err {err:.3e}")
    assert err < 1e-4
    # attention never crosses images: each image alone gives the same rows
    single = ours.embed_multimodal("image", dict(processor(images=[images[1]], return_tensors="pt")))
    start = num_mm_tokens(grids, 2)[0]
    torch.testing.assert_close(got[start : start + single.shape[0]], single, rtol=0, atol=1e-5)


def test_vision_chunked_pass_equals_one_pass(ours, processor):
    """EncoderGraphCache's chunking of a big pass (runs of same-grid images, each at most
    chunk_patches patches; an image bigger than a chunk alone, eagerly) gives the rows one pass
    over all images gives. The replay itself needs CUDA (tests/test_gpu_engine.py); here each
    chunk runs the tower eagerly and the chunks it would replay are recorded."""
    from engine.cuda_graphs import EncoderGraphCache

    images = [tiny_vlm.random_image(56, 84, seed=s) for s in range(5)] + [
        tiny_vlm.random_image(100, 150, seed=9), tiny_vlm.random_image(56, 84, seed=7)]
    inputs = processor(images=images, return_tensors="pt")
    pv, grid = inputs["pixel_values"], inputs["image_grid_thw"].tolist()
    per = grid[0][0] * grid[0][1] * grid[0][2]
    cache = EncoderGraphCache(ours.visual, max_patches=per, chunk_patches=2 * per)
    replayed = []
    cache._replay = lambda rows, g: replayed.append(tuple(map(tuple, g))) or ours.visual(rows, g)
    with torch.no_grad():
        got = cache._chunked(pv, grid)
        ref = ours.visual(pv, grid)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    g0 = tuple(grid[0])
    assert replayed == [(g0, g0), (g0, g0), (g0,), (g0,)]  # 2 + 2 + 1, the big image eager, then 1


@torch.no_grad()
def test_vision_video(ours, hf_model, processor):
    frames = [tiny_vlm.random_image(60, 90, seed=10 + i) for i in range(5)]  # padded to 6 frames
    pixel_values_videos, grid = tiny_vlm.video_pixel_values(frames, processor)
    assert grid.tolist() == [[3, 4, 6]]
    ref = torch.cat(hf_model.model.get_video_features(pixel_values_videos, grid).pooler_output)
    got = ours.embed_multimodal("video", {"pixel_values_videos": pixel_values_videos, "video_grid_thw": grid})
    assert got.shape == (18, 64)
    err = (got - ref).abs().max().item()
    print(f"video max abs err {err:.3e}")
    assert err < 1e-4


def test_precomputed_embeds_returned_as_is(ours):
    emb = torch.randn(7, 64)
    assert ours.embed_multimodal("image", {"image_embeds": emb}) is emb
    assert ours.embed_multimodal("video", {"video_embeds": emb}) is emb
    with pytest.raises(ValueError):
        ours.embed_multimodal("audio", {})


# ---------------------------------------------------------------------------------------------
# M-RoPE
# ---------------------------------------------------------------------------------------------


def _mrope_cases():
    img_a, img_b, img_c = [1, 8, 10], [1, 4, 4], [1, 6, 14]
    vid_short, vid_wide = [2, 4, 6], [3, 8, 6]
    return {
        "text only": ([], []),
        "one image": ([img_a], []),
        "three images": ([img_a, img_b, img_c], []),
        "one video": ([], [vid_short]),
        "image + video + image": ([img_c, img_b], [vid_wide]),
    }


def _build_prompt(tokenizer, images, videos, order=None):
    items = [("image", g) for g in images] + [("video", g) for g in videos]
    if order is not None:
        items = [items[i] for i in order]
    return tiny_vlm.image_prompt_ids(tokenizer, items)


@pytest.mark.parametrize(
    "case", ["text only", "one image", "three images", "one video", "image + video + image"]
)
def test_mrope_positions_match_hf(hf_model, tokenizer, case):
    images, videos = _mrope_cases()[case]
    order = [0, 2, 1] if case == "image + video + image" else None
    ids = _build_prompt(tokenizer, images, videos, order)
    cfg = hf_model.config
    pos, delta = get_mrope_positions(ids, images or None, videos or None, cfg)
    assert pos.shape == (3, len(ids)) and pos.dtype == torch.int64
    ids_t = torch.tensor([ids])
    if images or videos:
        ref, ref_delta = hf_model.model.get_rope_index(
            ids_t,
            _token_types(ids_t, cfg),
            image_grid_thw=torch.tensor(images) if images else None,
            video_grid_thw=torch.tensor(videos) if videos else None,
        )
        ref, ref_delta = ref[:, 0], int(ref_delta.item())
    else:  # HF uses plain 1-D positions for text-only prompts
        ref, ref_delta = torch.arange(len(ids)).view(1, -1).expand(3, -1), 0
    assert torch.equal(pos, ref), case
    assert delta == ref_delta
    # decode positions: absolute index p -> p + delta in all rows
    dec = get_mrope_decode_positions(len(ids), len(ids) + 2, delta)
    assert dec.tolist() == [[len(ids) + delta, len(ids) + delta + 1]] * 3


def test_mrope_long_video_rule(hf_model, tokenizer):
    """A video longer (in t) than wide: text after it starts at the video's max position + 1 (the
    original Qwen2-VL rule); transformers 5 advances by max(h, w) / merge, which we reproduce
    with ``hf5_spatial_advance=True``."""
    videos = [[6, 4, 4]]  # t=6 > max(h, w)/2 = 2
    ids = _build_prompt(tokenizer, [], videos)
    cfg = hf_model.config
    pos, delta = get_mrope_positions(ids, None, videos, cfg)
    start = ids.index(cfg.video_token_id)
    n_vid = 6 * 2 * 2
    assert pos[:, start + n_vid].tolist() == [start + 6] * 3  # start + max(t-1, 1, 1) + 1
    assert delta == int(pos.max()) + 1 - len(ids)
    ids_t = torch.tensor([ids])
    ref, ref_delta = hf_model.model.get_rope_index(
        ids_t, _token_types(ids_t, cfg), image_grid_thw=None, video_grid_thw=torch.tensor(videos)
    )
    pos5, delta5 = get_mrope_positions(ids, None, videos, cfg, hf5_spatial_advance=True)
    assert torch.equal(pos5, ref[:, 0]) and delta5 == int(ref_delta.item())


def test_mrope_positions_errors(hf_model, tokenizer):
    ids = _build_prompt(tokenizer, [[1, 4, 4]], [])
    with pytest.raises(ValueError):
        get_mrope_positions(ids, None, None, hf_model.config)  # grid missing
    with pytest.raises(ValueError):
        get_mrope_positions(ids, [[1, 4, 8]], None, hf_model.config)  # too few placeholders


def test_mrotary_matches_hf(hf_model):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

    text_cfg = hf_model.config.text_config
    g = torch.Generator().manual_seed(0)
    n, heads, kv_heads, d = 37, 4, 2, 16
    positions = torch.randint(0, 300, (3, n), generator=g)
    q = torch.randn(n, heads, d, generator=g)
    k = torch.randn(n, kv_heads, d, generator=g)
    hf_rot = Qwen2VLRotaryEmbedding(text_cfg)
    cos, sin = hf_rot(q, positions[:, None, :])  # [1, n, d]
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    ours_rot = MRotaryEmbedding(text_cfg, d)
    got_q, got_k = ours_rot(positions, q, k)
    torch.testing.assert_close(got_q, ref_q[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(got_k, ref_k[0].transpose(0, 1), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Full LM: prefill + decode over the paged KV cache
# ---------------------------------------------------------------------------------------------


def _meta(slots: list[int], blocks: list[int], seq_len: int, query_len: int) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor([blocks], dtype=torch.int32),
        query_start_loc=torch.tensor([0, query_len], dtype=torch.int32),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32),
        max_query_len=query_len,
        max_seq_len=seq_len,
        block_size=BLOCK_SIZE,
        query_start_loc_cpu=[0, query_len],
        seq_lens_cpu=[seq_len],
    )


def _slots(blocks: list[int], start: int, end: int) -> list[int]:
    return [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]


def _kv_caches(model, num_blocks: int) -> list[torch.Tensor]:
    backend = get_backend("cpu")
    shape = backend.kv_cache_shape(num_blocks, BLOCK_SIZE, model.num_kv_heads, model.head_dim)
    return [torch.zeros(shape) for _ in range(model.num_layers)]


@torch.no_grad()
def _prompt_embeds(model, ids: list[int], image_embeds: torch.Tensor) -> torch.Tensor:
    ids_t = torch.tensor(ids)
    embeds = model.get_input_embeddings(ids_t)
    mask = ids_t == model.image_token_id
    assert int(mask.sum()) == image_embeds.shape[0]
    embeds[mask] = image_embeds.to(embeds.dtype)
    return embeds


@torch.no_grad()
def test_lm_prefill_and_decode_match_hf(ours, hf_model, processor, tokenizer):
    inputs = processor(images=[tiny_vlm.random_image(100, 150, seed=1)], return_tensors="pt")
    grid = inputs["image_grid_thw"]
    ids = tiny_vlm.image_prompt_ids(tokenizer, [("image", grid[0].tolist())])
    L = len(ids)
    cfg = hf_model.config

    # HF reference: prefill, then one decode step with its cache.
    ids_t = torch.tensor([ids])
    ref = hf_model(
        input_ids=ids_t,
        pixel_values=inputs["pixel_values"],
        image_grid_thw=grid,
        mm_token_type_ids=_token_types(ids_t, cfg),
        use_cache=True,
    )
    ref_last = ref.logits[0, -1]
    nxt = int(ref_last.argmax())
    ref2 = hf_model(input_ids=torch.tensor([[nxt]]), cache=ref.cache, use_cache=True)
    ref_next = ref2.logits[0, -1]

    # Ours: one varlen prefill step.
    positions, delta = get_mrope_positions(ids, grid, None, cfg)
    embeds = _prompt_embeds(ours, ids, ours.embed_multimodal("image", dict(inputs)))
    num_blocks = 1 + (L + 1 + BLOCK_SIZE - 1) // BLOCK_SIZE
    blocks = list(range(1, num_blocks))  # block 0 is the null block
    kv = _kv_caches(ours, num_blocks)
    hidden = ours(None, positions, kv, _meta(_slots(blocks, 0, L), blocks, L, L), inputs_embeds=embeds)
    logits = ours.compute_logits(hidden[-1:])[0]
    err = (logits - ref_last).abs().max().item()
    print(f"prefill last-token logits max abs err {err:.3e} (delta {delta})")
    assert err < 1e-3
    assert int(logits.argmax()) == nxt

    # Decode step: token at absolute index L has position L + delta in all three rows.
    dec_pos = get_mrope_decode_positions(L, L + 1, delta)
    hidden = ours(torch.tensor([nxt]), dec_pos, kv, _meta(_slots(blocks, L, L + 1), blocks, L + 1, 1))
    logits2 = ours.compute_logits(hidden)[0]
    err2 = (logits2 - ref_next).abs().max().item()
    print(f"decode logits max abs err {err2:.3e}")
    assert err2 < 1e-3

    # Chunked prefill (two steps, split inside the image run) gives the same last-token logits.
    kv2 = _kv_caches(ours, num_blocks)
    cut = ids.index(ours.image_token_id) + 5
    ours(None, positions[:, :cut], kv2, _meta(_slots(blocks, 0, cut), blocks, cut, cut), inputs_embeds=embeds[:cut])
    hidden = ours(
        None, positions[:, cut:], kv2, _meta(_slots(blocks, cut, L), blocks, L, L - cut), inputs_embeds=embeds[cut:]
    )
    torch.testing.assert_close(ours.compute_logits(hidden[-1:])[0], logits, rtol=0, atol=1e-4)
