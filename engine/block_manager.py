"""Paged KV-cache block manager with reference counts and prefix caching.

Blocks hold ``block_size`` tokens. A *full* block is identified by a hash chained over its
parent block's hash, its token ids and any extra keys (image hashes later), so two requests
share a block only when everything before and inside it is identical. Freed blocks keep their
hash and stay findable until they are reused (LRU order), which is what makes a preempted or
repeated prompt cheap to recompute.

Block 0 is a reserved null block: never handed out, it is where padded tokens write and what
padded block-table entries point at.
"""

from __future__ import annotations

import array
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from engine.request import Request


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    hash: bytes | None = None


def hash_block(parent: bytes | None, token_ids: list[int], extra_keys: tuple[Any, ...] = ()) -> bytes:
    """sha256(parent hash, token ids, extra keys): collision-resistant, stable across processes."""
    h = hashlib.sha256(parent or b"root")
    h.update(array.array("q", token_ids).tobytes())  # fixed-width: unambiguous, ~3x faster than text
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        assert num_blocks >= 2, "need the null block and at least one usable block"
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (least recently freed first); block 0 is never free.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.cached: dict[bytes, int] = {}  # full-block hash -> block id
        self.num_queried_tokens = 0  # prefix-cache statistics, in tokens
        self.num_hit_tokens = 0

    # -- accounting -----------------------------------------------------------------------------
    @property
    def num_usable_blocks(self) -> int:
        return len(self.blocks) - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # -- prefix cache ---------------------------------------------------------------------------
    def _update_hashes(self, req: Request, upto_tokens: int) -> None:
        """Extend req.block_hashes to cover every full block among the first ``upto_tokens`` tokens
        whose ids are known: a block that a still-pending sampled token would complete (async
        scheduling allocates ahead of it) is hashed once that token is appended."""
        bs = self.block_size
        upto_tokens = min(upto_tokens, req.num_tokens)
        while (len(req.block_hashes) + 1) * bs <= upto_tokens:
            i = len(req.block_hashes)
            parent = req.block_hashes[-1] if req.block_hashes else None
            extra = req.block_extra_keys.get(i, ())
            req.block_hashes.append(hash_block(parent, req.all_token_ids[i * bs : (i + 1) * bs], extra))

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Cached blocks forming the longest prefix of ``req``; at least one token is left to compute."""
        if not self.enable_prefix_caching or req.skip_prefix_cache:
            return []
        # The last token must be recomputed to get logits, so look only at the first num_tokens - 1.
        self._update_hashes(req, req.num_tokens - 1)
        hits: list[int] = []
        for h in req.block_hashes[: (req.num_tokens - 1) // self.block_size]:
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    # -- allocation (check, then act) -----------------------------------------------------------
    def can_allocate(self, req: Request, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        """Whether ``num_new_tokens`` more tokens of ``req`` fit, after reusing ``computed_blocks``."""
        held = len(req.block_ids) + len(computed_blocks)
        total = req.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        needed = self.blocks_needed(total) - held
        # Cached blocks we are about to take are counted as free now but will not be after touching.
        reclaimed = sum(1 for b in computed_blocks if self.blocks[b].ref_cnt == 0)
        return needed <= self.num_free_blocks - reclaimed

    def allocate(self, req: Request, num_new_tokens: int, computed_blocks: list[int] = ()) -> None:
        """Take ``computed_blocks`` (prefix hits) and enough fresh blocks for ``num_new_tokens``."""
        if not req.block_ids and self.enable_prefix_caching and not req.skip_prefix_cache:
            # Counted on admission only: a request that waits for blocks is looked up every step.
            self.num_queried_tokens += req.num_tokens
            self.num_hit_tokens += len(computed_blocks) * self.block_size
        for block_id in computed_blocks:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self.free[block_id]
            block.ref_cnt += 1
            req.block_ids.append(block_id)
        if computed_blocks:
            req.num_computed_tokens += len(computed_blocks) * self.block_size
        total = req.num_computed_tokens + num_new_tokens
        for _ in range(self.blocks_needed(total) - len(req.block_ids)):
            req.block_ids.append(self._pop_free())
        self._cache_full_blocks(req, total)

    def _pop_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict: its content is about to be overwritten
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
        assert block.ref_cnt == 0
        block.ref_cnt = 1
        return block_id

    def _cache_full_blocks(self, req: Request, num_tokens: int) -> None:
        """Register the blocks that will be full once ``num_tokens`` tokens are computed."""
        if not self.enable_prefix_caching:
            return
        self._update_hashes(req, num_tokens)
        for i in range(min(len(req.block_hashes), num_tokens // self.block_size)):
            block = self.blocks[req.block_ids[i]]
            if block.hash is None:
                h = req.block_hashes[i]
                block.hash = h
                self.cached.setdefault(h, block.block_id)

    def free_request(self, req: Request) -> None:
        """Drop the request's references; blocks that reach zero become reusable, tail first so
        that a request's later blocks are evicted before its shared prefix."""
        for block_id in reversed(req.block_ids):
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0
            if block.ref_cnt == 0:
                self.free[block_id] = None
        req.block_ids = []

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (only when nothing is running, as vLLM does)."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        for block in self.blocks:
            block.hash = None
        self.cached.clear()
        return True
