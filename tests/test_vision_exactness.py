"""Our vision towers give HF transformers' tensors bit for bit (fp32, CPU), stage by stage, at the
tiny weight scale and at the large one (``weight_scale``).

Greedy equality with HF is only guaranteed where the arithmetic is the same: a last-bit
difference early in the image path (a 7e-7 relative error in Qwen2-VL's patch embedding, once
computed as a matmul where HF runs a Conv3d) grows through a chaotic random network with large
weights. So each stage is compared with ``torch.equal``, and a failure reports every stage's
relative error to point at the first one that differs.
"""

from __future__ import annotations

import pytest
import torch

import tiny_llava
import tiny_vlm
import tiny_vlm25
from weight_scale import SCALES, build_at_scale
from engine.loader import iterate_weights
from engine.models.llava import LlavaForConditionalGeneration
from engine.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from engine.models.qwen2_vl import Qwen2VLForConditionalGeneration
from kernels import get_backend

IMAGES = [(100, 150, 1), (56, 56, 2), (60, 300, 3)]  # mixed sizes: resized, exact, wide


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _assert_stages_equal(stages: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    report = ", ".join(f"{name}: rel {_rel(a, b):.2e}" for name, a, b in stages)
    for name, a, b in stages:
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != HF {tuple(b.shape)}"
        same = torch.equal(a, b)
        assert same, f"first differing stage: {name} ({report})"


def _load(model_cls, hf_model, model_dir):
    ours = model_cls(hf_model.config, get_backend("cpu")).eval()
    ours.load_weights(iterate_weights(model_dir))
    return ours


QWEN = {
    "qwen2_vl": (tiny_vlm.build_tiny_qwen2_vl, tiny_vlm.load_hf_qwen2_vl, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (tiny_vlm25.build_tiny_qwen2_5_vl, tiny_vlm25.load_hf_qwen2_5_vl, Qwen2_5_VLForConditionalGeneration),
}


@pytest.fixture(scope="module", params=[(a, s) for a in QWEN for s in SCALES], ids=lambda p: f"{p[0]}-{p[1]}")
def qwen(request, tmp_path_factory):
    arch, scale = request.param
    build, load_hf, cls = QWEN[arch]
    model_dir = build_at_scale(build, tmp_path_factory.mktemp(f"{arch}_{scale}"), scale, seed=0)
    hf = load_hf(model_dir)
    return hf, _load(cls, hf, model_dir), tiny_vlm.load_image_processor(model_dir)


@torch.no_grad()
def test_qwen_vision_tower_bit_exact(qwen):
    hf, ours, processor = qwen
    images = [tiny_vlm.random_image(h, w, s) for h, w, s in IMAGES]
    inputs = processor(images=images, return_tensors="pt")
    pv, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    stages = [("patch_embed", ours.visual.patch_embed(pv), hf.model.visual.patch_embed(pv))]
    ref = torch.cat(list(hf.model.get_image_features(pv, grid).pooler_output))
    stages.append(("tower output (merger)", ours.embed_multimodal("image", {"pixel_values": pv, "image_grid_thw": grid}), ref))
    _assert_stages_equal(stages)


@pytest.fixture(scope="module", params=SCALES)
def llava(request, tmp_path_factory):
    model_dir = build_at_scale(tiny_llava.build_tiny_llava, tmp_path_factory.mktemp(f"llava_{request.param}"),
                               request.param, seed=0)
    hf = tiny_llava.load_hf_llava(model_dir)
    return hf, _load(LlavaForConditionalGeneration, hf, model_dir), tiny_llava.load_image_processor(model_dir)


@torch.no_grad()
def test_llava_vision_tower_bit_exact(llava):
    hf, ours, processor = llava
    images = [tiny_llava.random_image(h, w, s) for h, w, s in IMAGES]
    pv = processor(images=images, return_tensors="pt")["pixel_values"]
    feats = hf.model.get_image_features(pixel_values=pv)
    pooled = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    ref = torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled]) if isinstance(pooled, (list, tuple)) else pooled.reshape(-1, pooled.shape[-1])
    got = ours.embed_multimodal("image", {"pixel_values": pv})
    _assert_stages_equal([("projected image features", got.reshape(ref.shape), ref)])
