"""Paged-attention test batches shared by the kernel tests: block tables scattered over the cache
and the AttentionMetadata of a batch of (seq_len, query_len) sequences."""

from __future__ import annotations

import math

import torch

from kernels import AttentionMetadata


def scattered_tables(seqs, block_size: int, generator: torch.Generator, spare: int = 7):
    """(tables, num_blocks): shuffled, non-contiguous block ids from 1.. (block 0 is the null block
    and never holds data), ``spare`` blocks left over as garbage."""
    blocks_per_seq = [math.ceil(ctx / block_size) for ctx, _ in seqs]
    num_blocks = 1 + sum(blocks_per_seq) + spare
    perm = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
    tables = []
    for n in blocks_per_seq:
        tables.append(perm[:n])
        perm = perm[n:]
    return tables, num_blocks


def slots_for(table: list[int], positions, block_size: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in positions]


def build_metadata(seqs, tables, block_size: int, table_pad: int = 0, device="cpu") -> AttentionMetadata:
    """Metadata of one step in which sequence i (context ctx, query ql) computes its last ql tokens."""
    qlens = [ql for _, ql in seqs]
    ctxs = [ctx for ctx, _ in seqs]
    qsl = [0]
    for ql in qlens:
        qsl.append(qsl[-1] + ql)
    slots = []
    for table, (ctx, ql) in zip(tables, seqs):
        slots += slots_for(table, range(ctx - ql, ctx), block_size)
    width = max(len(t) for t in tables) + table_pad
    block_tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=block_tables.to(device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(ctxs, dtype=torch.int32, device=device),
        max_query_len=max(qlens),
        max_seq_len=max(ctxs),
        block_size=block_size,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=ctxs,
    )
