"""The attention backend interface: what the model runner and the models may ask of a kernel.

A backend owns the layout of the KV cache (``kv_cache_shape``). The runner builds one
``AttentionMetadata`` per step; every attention layer of the model then calls ``write_kv`` with
the new keys/values and ``attend`` with the queries. Tokens of all sequences are flattened into
one varlen batch: sequence ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]`` and
these are its *last* tokens, so a query row at position ``p`` sees cached keys ``0..p``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import torch


@dataclass
class AttentionMetadata:
    """Per-step description of the flattened batch, shared by every layer."""

    # slot_mapping: [num_tokens] int64 — cache slot (block_id * block_size + offset) of each new token
    slot_mapping: torch.Tensor
    # block_tables: [num_seqs, max_blocks] int32 — block ids of each sequence, padded with 0
    block_tables: torch.Tensor
    # query_start_loc: [num_seqs + 1] int32 — cumulative query lengths (cu_seqlens_q)
    query_start_loc: torch.Tensor
    # seq_lens: [num_seqs] int32 — context length of each sequence after this step's tokens
    seq_lens: torch.Tensor
    max_query_len: int
    max_seq_len: int
    block_size: int
    # Host copies, so that reference kernels can loop without device->host syncs.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    # split_decodes()'s result, made on the first layer's call and reused by the others
    _split: tuple[AttentionMetadata | None, AttentionMetadata | None] | None = field(
        default=None, init=False, repr=False, compare=False)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    def num_leading_decodes(self) -> int:
        """How many sequences at the front of the batch have one query token each (the scheduler
        puts running requests first, so in a mixed step these are its decodes). Since
        ``query_start_loc[i] - i`` never decreases, it is the last k with ``query_start_loc[k] == k``:
        a binary search."""
        qsl = self.query_start_loc_cpu
        lo, hi = 0, self.num_seqs
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if qsl[mid] == mid:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def split_decodes(self) -> tuple[AttentionMetadata | None, AttentionMetadata | None]:
        """(the leading one-token sequences, the rest) as metadata of their own, either None when
        empty. Device tensors are sliced views (no copy, no sync); query rows stay absolute, so
        both halves index the step's full query and output tensors. A kernel for one-token
        queries then runs the decodes of a mixed step instead of a prefill kernel whose query
        tiles would be almost all padding for them."""
        if self._split is None:
            n = self.num_seqs if self.max_query_len == 1 else self.num_leading_decodes()
            if n == 0 or n == self.num_seqs:
                self._split = (self, None) if n else (None, self)
            else:
                decodes = replace(
                    self, block_tables=self.block_tables[:n], query_start_loc=self.query_start_loc[: n + 1],
                    seq_lens=self.seq_lens[:n], max_query_len=1, max_seq_len=max(self.seq_lens_cpu[:n]),
                    query_start_loc_cpu=self.query_start_loc_cpu[: n + 1], seq_lens_cpu=self.seq_lens_cpu[:n])
                rest = replace(
                    self, block_tables=self.block_tables[n:], query_start_loc=self.query_start_loc[n:],
                    seq_lens=self.seq_lens[n:], query_start_loc_cpu=self.query_start_loc_cpu[n:],
                    seq_lens_cpu=self.seq_lens_cpu[n:])
                self._split = (decodes, rest)
        return self._split


class AttentionBackend(ABC):
    """A paged-attention implementation. Instances are stateless and shared by all layers."""

    name: str = "abstract"

    @abstractmethod
    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor (keys and values together)."""

    @abstractmethod
    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Store new keys/values. key, value: [num_tokens, num_kv_heads, head_dim]."""

    @abstractmethod
    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Causal attention of the new tokens over each sequence's cached context.

        query: [num_tokens, num_heads, head_dim] -> returns [num_tokens, num_heads, head_dim].
        ``write_kv`` for the same tokens has already run, so the cache holds them too.
        """

    def rotary_write_kv(
        self,
        qk: torch.Tensor,
        value: torch.Tensor,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_heads: int,
    ) -> torch.Tensor:
        """Neox rotary of q and k over the full head_dim (``fused_ops.apply_rotary_signed``),
        then ``write_kv`` of the rotated keys and ``value``; returns the rotated queries.

        qk: [num_tokens, num_heads + num_kv_heads, head_dim] (q heads first; a strided view of a
        merged qkv is fine); value: [num_tokens, num_kv_heads, head_dim]; cos, sin_signed:
        [num_tokens, 1, head_dim] (sin with its first half negated) -> [num_tokens, num_heads,
        head_dim]. Backends may fuse the two (one kernel instead of two a layer).
        """
        from kernels import fused_ops

        qk = fused_ops.apply_rotary_signed(qk, cos, sin_signed, qk.shape[-1])
        self.write_kv(qk[:, num_heads:], value, kv_cache, slot_mapping)
        return qk[:, :num_heads]
