"""The Triton backend's fused rotary + KV-cache write (``TritonBackend.rotary_write_kv``) against
the two-step reference (the torch rotary of ``kernels.fused_ops`` then the torch backend's
``write_kv``): rotated queries and the whole cache must be equal bit for bit, over GQA ratios, head
dims, block sizes, strided q|k views of a merged qkv, padding slots (-1) and fp16 / bf16. fp32 and
a partial rotary take the unfused path. Runs on CUDA, or on CPU through Triton's interpreter
(tests/fused_setup.py); skips without triton.
"""

from __future__ import annotations

import fused_setup
import pytest
import torch
from fused_setup import interpreter_env  # noqa: F401 (autouse fixture)

DEVICE = fused_setup.setup("kernels.triton_attention")

from kernels import fused_ops  # noqa: E402
from kernels.torch_ref import TorchReferenceBackend  # noqa: E402
from kernels.triton_attention import TritonBackend  # noqa: E402

TRITON, TORCH = TritonBackend(), TorchReferenceBackend()


def _case(n, num_heads, num_kv_heads, head_dim, block_size, dtype, seed, pad=True):
    g = torch.Generator().manual_seed(seed)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = (torch.randn(n, width + 8, generator=g) * 3).to(dtype)[:, 4 : 4 + width]  # strided rows
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qk = qkv[:, : q_size + kv_size].view(n, num_heads + num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].view(n, num_kv_heads, head_dim)
    ang = torch.rand(n, 1, head_dim // 2, generator=g) * 6.3
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype)
    sin = torch.cat([-ang.sin(), ang.sin()], -1).to(dtype)
    num_blocks = n // block_size + 3
    cache = (torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g)).to(dtype)
    slots = torch.randperm((num_blocks - 1) * block_size, generator=g)[:n] + block_size
    if pad:
        slots[::5] = -1  # padding rows write nothing
    dev = DEVICE
    return [t.to(dev) for t in (qk, v, cos, sin, cache, slots)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", [
    (12, 2, 128, 16), (8, 8, 64, 32), (4, 1, 80, 16), (28, 4, 128, 16), (6, 3, 96, 8)])
@pytest.mark.parametrize("n", [1, 7, 33])
def test_fused_equals_rotary_then_write(n, num_heads, num_kv_heads, head_dim, block_size, dtype):
    qk, v, cos, sin, cache, slots = _case(n, num_heads, num_kv_heads, head_dim, block_size, dtype,
                                          seed=n * 100 + num_heads + head_dim)
    fused_ops.set_enabled(False)  # the reference: torch rotary, torch write
    try:
        ref_cache = cache.clone()
        rot = fused_ops.apply_rotary_signed(qk, cos, sin, head_dim)
        keep = slots >= 0
        TORCH.write_kv(rot[keep, num_heads:], v[keep], ref_cache, slots[keep])
        ref_q = rot[:, :num_heads]
    finally:
        fused_ops.set_enabled(None)
    got_cache = cache.clone()
    q = TRITON.rotary_write_kv(qk, v, cos, sin, got_cache, slots, num_heads)
    assert q.shape == (n, num_heads, head_dim) and q.dtype == dtype
    assert torch.equal(q, ref_q)
    assert torch.equal(got_cache, ref_cache)


def test_unfused_paths_agree():
    """fp32, and the fused kernels switched off, take the two-kernel path: same results."""
    qk, v, cos, sin, cache, slots = _case(9, 12, 2, 64, 16, torch.float32, seed=3, pad=False)
    a_cache, b_cache = cache.clone(), cache.clone()
    qa = TRITON.rotary_write_kv(qk, v, cos, sin, a_cache, slots, 12)
    qb = TORCH.rotary_write_kv(qk, v, cos, sin, b_cache, slots, 12)
    assert torch.equal(qa, qb) and torch.equal(a_cache, b_cache)
