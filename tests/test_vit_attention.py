"""The ViT attention kernel (kernels/triton_vit_attention.py) against float64 attention.

Bidirectional attention within equal-length frames of q / k / v [P, H, D] (v a strided view of a
fused qkv, as the vision tower passes it), head dims that are a power of two plus a power-of-two
remainder (80 = 64 + 16 is Qwen2-VL's), frame lengths that are not multiples of the key tile,
several runs of frames in one call, and every launch config of CONFIGS. The output is poisoned
with NaN first: every element must be written. The kernel runs on CUDA (skips without a GPU);
``split_head_dim`` is checked everywhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from kernels.triton_vit_attention import CONFIGS, split_head_dim, vit_attention

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("d,parts", [(80, (64, 16)), (64, (64, 0)), (96, (64, 32)), (128, (128, 0)), (48, (32, 16))])
def test_split_head_dim(d, parts):
    assert split_head_dim(d) == parts


@pytest.mark.parametrize("d", [72, 8, 100])
def test_split_head_dim_refuses(d):
    with pytest.raises(ValueError, match="head_dim"):
        split_head_dim(d)


def reference(q, k, v, runs, scale):
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for start, end, frames, length in runs:
        t = [x[start:end].double().view(frames, length, *x.shape[1:]).transpose(1, 2) for x in (q, k, v)]
        o = F.scaled_dot_product_attention(*t, scale=scale)
        out[start:end] = o.transpose(1, 2).reshape(end - start, *q.shape[1:])
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("d,heads,frames_spec,dtype", [
    (80, 16, [(3, 1024)], torch.bfloat16),          # Qwen2-VL-2B's ViT, W1's 448x448 images
    (80, 4, [(2, 100), (1, 37), (4, 256)], torch.bfloat16),  # mixed sizes, lengths off the tiles
    (80, 3, [(5, 63)], torch.float16),
    (64, 4, [(2, 129)], torch.bfloat16),
    (96, 2, [(1, 300), (2, 16)], torch.float16),
    (128, 2, [(3, 77)], torch.bfloat16),
])
def test_vit_attention_matches_float64(config, d, heads, frames_spec, dtype):
    g = torch.Generator(device="cuda").manual_seed(d * 7 + heads + len(frames_spec))
    rows = sum(f * n for f, n in frames_spec)
    qkv = torch.randn(rows, 3, heads, d, device="cuda", dtype=dtype, generator=g)
    q, k, v = qkv[:, 0].contiguous(), qkv[:, 1].contiguous(), qkv[:, 2]  # v strided, as in the tower
    runs, r = [], 0
    for frames, n in frames_spec:
        runs.append((r, r + frames * n, frames, n))
        r += frames * n
    scale = 0.7 / d**0.5
    out = torch.full((rows, heads, d), float("nan"), device="cuda", dtype=dtype)
    vit_attention(q, k, v, runs, scale=scale, config=config, out=out)
    ref = reference(q, k, v, runs, scale)
    assert torch.isfinite(out).all(), "an output element was not written"
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel  # bf16 / fp16 inputs, p rounded to the dtype: ~3e-3 expected
    # the same call through torch's SDPA in the dtype (what the tower runs otherwise) is as close
    sdpa = reference(q.float(), k.float(), v.float(), runs, scale).to(dtype)
    rel_sdpa = ((sdpa.double() - ref).norm() / ref.norm()).item()
    assert rel < 4 * rel_sdpa + 2e-3, (rel, rel_sdpa)
