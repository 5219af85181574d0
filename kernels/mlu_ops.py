"""Cambricon MLU backend over Cambricon's ``torch_mlu_ops`` (the op library its vLLM plugin uses).

* K/V write: ``reshape_paged_cache(k, v, k_cache, v_cache, slot_mapping)``
* prefill / mixed batches: ``flash_attention(q, k_cache, v_cache, out, cu_seq_lens_q, cu_seq_lens_kv,
  alibi, bias, max_q, max_kv, scale, is_causal, window_left, window_right, compute_dtype,
  return_lse, block_tables)`` — varlen and causal over paged context
* decode: ``single_query_cached_kv_attn(q, k_cache, v_cache, out, block_tables, context_lens,
  k_scale, v_scale, alibi, max_context_len, window_left, window_right, scale)``

These ops want the cache as ``[num_blocks, num_kv_heads, block_size, head_dim]`` per K and V, so
this backend's layout is ``(2, num_blocks, num_kv_heads, block_size, head_dim)`` (the reference
backend's is ``(2, num_blocks, block_size, num_kv_heads, head_dim)``).

**Not run on MLU hardware**: we have none. What is tested (tests/test_kernels_mlu.py, on CPU) is
the selection logic and that this file lays out the cache and passes arguments so that ops with
the documented semantics give the reference backend's results. Where ``torch_mlu_ops`` is absent
on an MLU, the registry falls back to the portable torch reference, which runs through torch_mlu.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import AttentionBackend, AttentionMetadata


class MLUOpsBackend(AttentionBackend):
    name = "mlu_ops"

    def __init__(self) -> None:
        import torch_mlu_ops  # ImportError -> the registry falls back to the torch reference

        self.ops = torch_mlu_ops

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, num_kv_heads, block_size, head_dim)

    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        # key, value: [num_tokens, Hkv, D]; slot_mapping: [num_tokens] (the ops take int32)
        self.ops.reshape_paged_cache(
            key.to(kv_cache.dtype), value.to(kv_cache.dtype), kv_cache[0], kv_cache[1], slot_mapping.to(torch.int32)
        )

    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        # query: [N, H, D] -> out [N, H, D]
        out = torch.empty_like(query)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        if metadata.is_decode_only:
            num_seqs, heads, dim = query.shape
            self.ops.single_query_cached_kv_attn(
                query.view(num_seqs, 1, heads, dim), k_cache, v_cache, out.view(num_seqs, 1, heads, dim),
                metadata.block_tables, metadata.seq_lens, None, None, None, metadata.max_seq_len, 0, 0, scale,
            )
            return out
        # cu_seq_lens_kv: [num_seqs + 1] int32, prefix sums of the context lengths
        cu_kv = F.pad(metadata.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        self.ops.flash_attention(
            query, k_cache, v_cache, out, metadata.query_start_loc, cu_kv, None, None,
            metadata.max_query_len, metadata.max_seq_len, scale, True, -1, -1, torch.float, False,
            metadata.block_tables,
        )
        return out
