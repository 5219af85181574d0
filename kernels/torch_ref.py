"""Portable PyTorch reference for paged attention and KV-cache writes.

Runs wherever PyTorch runs: CPU, CUDA, and MLU through torch_mlu. It is the ground truth that
fast backends are tested against, so it favours clarity over speed: one batched SDPA call for
decode-only steps, and one SDPA call per sequence otherwise.

KV cache layout (one tensor per layer): [2, num_blocks, block_size, num_kv_heads, head_dim],
index 0 holding keys and 1 values. Block 0 is reserved by the block manager as a null block, so
padded tokens may write to slot 0..block_size-1 harmlessly and padded block-table entries read it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import AttentionBackend, AttentionMetadata


def _gather_context(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """cache: [num_blocks, block_size, H, D], block_ids: [n] -> [length, H, D]."""
    return cache.index_select(0, block_ids).flatten(0, 1)[:length]


class TorchReferenceBackend(AttentionBackend):
    name = "torch"

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        # key/value: [num_tokens, Hkv, D]; slot_mapping: [num_tokens] int64
        num_kv_heads, head_dim = key.shape[1], key.shape[2]
        kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
        kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(kv_cache.dtype))

    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        if metadata.is_decode_only:
            return self._decode(query, kv_cache, metadata, scale)
        out = torch.empty_like(query)
        bs = metadata.block_size
        starts = metadata.query_start_loc_cpu
        for i, ctx in enumerate(metadata.seq_lens_cpu):
            q0, q1 = starts[i], starts[i + 1]
            qlen = q1 - q0
            if qlen == 0:
                continue
            blocks = metadata.block_tables[i, : (ctx + bs - 1) // bs]
            k = _gather_context(kv_cache[0], blocks, ctx)  # [ctx, Hkv, D]
            v = _gather_context(kv_cache[1], blocks, ctx)
            q = query[q0:q1]  # [qlen, H, D]
            if qlen == ctx:
                mask = None
                causal = True
            else:
                # query row j sits at position ctx - qlen + j and sees keys 0..that position
                q_pos = torch.arange(ctx - qlen, ctx, device=query.device)
                mask = torch.arange(ctx, device=query.device)[None, :] <= q_pos[:, None]
                causal = False
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1).to(k.dtype),
                k.transpose(0, 1),
                v.transpose(0, 1),
                attn_mask=mask,
                is_causal=causal,
                scale=scale,
                enable_gqa=True,
            )
            out[q0:q1] = o.transpose(0, 1).to(out.dtype)
        return out

    def _decode(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        # One query token per sequence: gather every sequence's blocks at once.
        bs = metadata.block_size
        max_blocks = (metadata.max_seq_len + bs - 1) // bs
        tables = metadata.block_tables[:, :max_blocks].long()  # [B, nb]
        num_seqs = tables.shape[0]
        k = kv_cache[0][tables].flatten(1, 2)  # [B, nb*bs, Hkv, D]
        v = kv_cache[1][tables].flatten(1, 2)
        length = k.shape[1]
        # mask: [B, 1, 1, L] — key j of sequence b is valid when j < seq_lens[b]
        valid = torch.arange(length, device=query.device)[None, :] < metadata.seq_lens[:, None]
        q = query.view(num_seqs, 1, query.shape[1], query.shape[2]).transpose(1, 2)  # [B, H, 1, D]
        o = F.scaled_dot_product_attention(
            q.to(k.dtype),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=valid[:, None, None, :],
            scale=scale,
            enable_gqa=True,
        )  # [B, H, 1, D]
        return o.transpose(1, 2).reshape(query.shape).to(query.dtype)
