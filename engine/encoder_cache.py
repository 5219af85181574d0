"""Encoder cache: vision-tower outputs keyed by item content hash.

An item is encoded once when the first chunk that covers any of its placeholder tokens is
scheduled, then sliced by later chunks (chunked prefill may cut through an image), and reused by
any request carrying the same content. Entries not in use by a live request are evicted
least-recently-used first when the cache is over its size (counted in embedding rows).
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, capacity_rows: int) -> None:
        self.capacity_rows = capacity_rows
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()  # identifier -> [rows, hidden]
        self.users: dict[str, set[str]] = {}  # identifier -> request ids using it
        self.num_rows = 0
        self.hits = 0
        self.misses = 0

    def get(self, identifier: str, request_id: str) -> torch.Tensor | None:
        emb = self.entries.get(identifier)
        if emb is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(identifier)
        self.users.setdefault(identifier, set()).add(request_id)
        return emb

    def put(self, identifier: str, request_id: str, embeds: torch.Tensor) -> None:
        # embeds: [rows, hidden]
        if identifier not in self.entries:
            self.entries[identifier] = embeds
            self.num_rows += embeds.shape[0]
        self.users.setdefault(identifier, set()).add(request_id)
        self._evict()

    def release(self, request_id: str) -> None:
        """A request finished or was preempted: its items may now be evicted."""
        for identifier in list(self.users):
            self.users[identifier].discard(request_id)
            if not self.users[identifier]:
                del self.users[identifier]
        self._evict()

    def _evict(self) -> None:
        for identifier in list(self.entries):
            if self.num_rows <= self.capacity_rows:
                return
            if identifier in self.users:
                continue  # in use by a live request
            self.num_rows -= self.entries.pop(identifier).shape[0]
