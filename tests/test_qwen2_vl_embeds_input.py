"""Qwen2-VL precomputed image embeddings for several images, in every form vLLM's guide takes:

* ``{"image_embeds": (num_images, feature_size, hidden), "image_grid_thw": (num_images, 3)}``
  (images of one size; issue 15: it used to be rejected);
* ``{"image_embeds": (total_feature_size, hidden), "image_grid_thw": (num_images, 3)}`` (rows of
  images of any size, concatenated);
* a list of per-image dicts ``{"image_embeds": (feature_size, hidden), "image_grid_thw": (1, 3)}``.

The oracle is HF ``generate`` given the same embeddings (``mm_encoder_outputs``, so HF runs no vision
tower), with the grids for M-RoPE. The embeddings are HF's own vision features of random images,
scaled and shifted per image so that they are no vision tower's output: only the embeddings path is
tested. Both weight scales (``weight_scale``); the input-error checks at the tiny one.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tiny_vlm
from tiny_vlm import make_prompt
from weight_scale import build_at_scale, tiny_only
from engine import LLM, SamplingParams

MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
# Two images of one size (grid 1x8x10 -> 20 LM tokens each) and one of another (1x4x22 -> 22).
SAME_SIZE = [tiny_vlm.random_image(100, 150, 11), tiny_vlm.random_image(100, 150, 12)]
OTHER_SIZE = tiny_vlm.random_image(60, 300, 13)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, scale):
    return build_at_scale(tiny_vlm.build_tiny_qwen2_vl, tmp_path_factory.mktemp(f"qwen2_vl_embeds_{scale}"),
                          scale, seed=3)


@pytest.fixture(scope="module")
def hf(vlm_dir):
    return tiny_vlm.load_hf_qwen2_vl(vlm_dir)


@pytest.fixture(scope="module")
def llm(vlm_dir):
    return LLM(str(vlm_dir), dtype="float32", device="cpu", max_model_len=512, max_num_seqs=8,
               limit_mm_per_prompt={"image": 4})


@pytest.fixture(scope="module")
def embeds(hf, vlm_dir) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(embeddings [feature_size, hidden], grid [1, 3]) of SAME_SIZE[0], SAME_SIZE[1], OTHER_SIZE."""
    out = []
    for i, image in enumerate([*SAME_SIZE, OTHER_SIZE]):
        e, grid = tiny_vlm.hf_image_embeds(hf, tiny_vlm.load_image_processor(vlm_dir), image)
        out.append((e * (1.0 + 0.25 * i) + 0.05 * (i + 1), grid))  # no vision tower gives these
    return out


@torch.no_grad()
def hf_greedy_given_embeds(hf, tokenizer, text: str, items: list[tuple[torch.Tensor, torch.Tensor]]):
    """(expanded prompt ids, HF greedy continuation) of ``text`` whose i-th ``<|image_pad|>`` stands
    for ``items[i]`` = (embeddings, grid); HF takes the embeddings as its encoder output."""
    cfg = hf.config
    grids = torch.cat([g for _, g in items])
    ids, it = [], iter(grids.tolist())
    for t in tokenizer(text).input_ids:
        ids += [t] * (math.prod(next(it)) // 4) if t == cfg.image_token_id else [t]
    inp = torch.tensor([ids])
    encoded = BaseModelOutputWithPooling(pooler_output=tuple(e for e, _ in items))
    g = hf.generate(input_ids=inp, attention_mask=torch.ones_like(inp), do_sample=False,
                    max_new_tokens=MAX_TOKENS, image_grid_thw=grids,
                    mm_token_type_ids=(inp == cfg.image_token_id).int(), mm_encoder_outputs={"image": encoded})
    return ids, g[0, len(ids):].tolist()


def _run(llm, text: str, image_data) -> tuple[list[int], list[int]]:
    out = llm.generate({"prompt": text, "multi_modal_data": {"image": image_data}}, GREEDY, use_tqdm=False)[0]
    return out.prompt_token_ids, list(out.outputs[0].token_ids)


def test_stacked_embeds_of_several_images_equal_hf(llm, hf, embeds):
    """(num_images, feature_size, hidden) with (num_images, 3) grids: the form that was rejected."""
    text = make_prompt(2, "Compare the two pictures.")
    items = embeds[:2]
    want = hf_greedy_given_embeds(hf, llm.get_tokenizer(), text, items)
    stacked = {"image_embeds": torch.stack([e for e, _ in items]), "image_grid_thw": torch.cat([g for _, g in items])}
    assert stacked["image_embeds"].shape == (2, 20, hf.config.text_config.hidden_size)
    assert _run(llm, text, stacked) == want
    assert len(want[1]) > 0


def test_flat_and_per_image_embeds_of_mixed_sizes_equal_hf(llm, hf, embeds):
    """Rows of three images (two sizes) concatenated, and the same as a list of per-image dicts."""
    text = make_prompt(3, "Describe all three.")
    items = [embeds[2], embeds[0], embeds[1]]
    want = hf_greedy_given_embeds(hf, llm.get_tokenizer(), text, items)
    flat = {"image_embeds": torch.cat([e for e, _ in items]), "image_grid_thw": torch.cat([g for _, g in items])}
    per_image = [{"image_embeds": e, "image_grid_thw": g} for e, g in items]
    assert _run(llm, text, flat) == want
    assert _run(llm, text, per_image) == want


@tiny_only
def test_embeds_form_errors_name_the_field(llm, embeds):
    (e0, g0), (e1, g1), (e2, g2) = embeds
    text = make_prompt(2)
    cases = {
        # a 3-D tensor needs the grids: Qwen2-VL positions (M-RoPE) come from them
        "image_grid_thw": torch.stack([e0, e1]),
        # images of different sizes cannot share one (num_images, feature_size, hidden) tensor
        "feature_size": {"image_embeds": torch.stack([e0, e1]), "image_grid_thw": torch.cat([g0, g2])},
        # as many images in the tensor as rows in the grid
        "num_images": {"image_embeds": torch.stack([e0, e1, e1]), "image_grid_thw": torch.cat([g0, g1])},
    }
    for what, data in cases.items():
        with pytest.raises(ValueError, match=r"image_embeds|image_grid_thw") as info:
            _run(llm, text, data)
        assert what in str(info.value), (what, str(info.value))
    assert not llm.core.has_unfinished()
