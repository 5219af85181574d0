"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

There is no prefill or decode phase: each step gives every running request up to
``num_tokens - num_computed_tokens`` tokens of the budget (a decode is one token, a prompt may be
cut into chunks), then admits waiting requests while budget, sequence slots and KV blocks last.
When blocks run out, the most recently admitted running request is preempted: its blocks are
freed (they stay in the prefix cache) and it goes back to the front of the queue to be recomputed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """What the model runner computes this step: (request, number of new tokens), in batch order."""

    scheduled: list[tuple[Request, int]]
    num_batched_tokens: int
    preempted: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[str] = []
        bm = self.block_manager
        block_size = bm.block_size

        # 1. Running requests, oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new == 1:
                # Decode fast path: the token lands in a block the request already holds and does
                # not fill it, so allocate() would take no block and register no new full block.
                total = req.num_computed_tokens + 1
                if total % block_size and len(req.block_ids) * block_size >= total:
                    scheduled.append((req, 1))
                    budget -= 1
                    i += 1
                    continue
            while not bm.can_allocate(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                bm.allocate(req, num_new)
                scheduled.append((req, num_new))
                budget -= num_new
                i += 1
                continue
            break  # req itself was preempted: nothing newer is left to run

        # 2. Waiting requests (preempted ones first), while budget, slots and blocks last.
        if not preempted:
            budget = self._admit(scheduled, budget)

        total = self.config.max_num_batched_tokens - budget
        return SchedulerOutput(scheduled=scheduled, num_batched_tokens=total, preempted=preempted)

    def _admit(self, scheduled: list[tuple[Request, int]], budget: int) -> int:
        """Move waiting requests (preempted ones first) to running while budget, sequence slots
        and KV blocks last; appends them to ``scheduled`` and returns the budget left."""
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            computed = bm.get_computed_blocks(req) if req.num_computed_tokens == 0 else []
            num_new = req.num_tokens - req.num_computed_tokens - len(computed) * bm.block_size
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not bm.can_allocate(req, num_new, computed):
                break
            self.waiting.popleft()
            bm.allocate(req, num_new, computed)
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.time()
                req.num_cached_tokens = len(computed) * bm.block_size
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append((req, num_new))
            budget -= num_new
        return budget

    def schedule_next(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """The step after ``prev``, scheduled before ``prev``'s sampled tokens are known (async
        scheduling), or None when it cannot be.

        Every running request must be in ``prev`` and chainable (its sampling reads nothing on the
        host that a pending token would change, and needs no host sync). Each continues where
        ``prev`` leaves it: a prompt cut by ``prev`` gets its next chunk (ids known on the host), a
        request ``prev`` samples for computes that token (its id stays on the device: the runner
        reads it from ``prev``'s output; ``num_pending_tokens`` = 1). Requests certain to finish
        with ``prev``'s token (max_tokens, max_model_len) are left out; ones that turn out to stop
        on it (EOS, stop ids) are computed once in vain and dropped when their output arrives.
        Waiting requests are then admitted with the budget left. ``num_inflight_tokens`` records
        each continuing request's tokens in ``prev`` (its computed count lags by that much until
        ``prev``'s output is processed). No preemption: if blocks are short, the caller falls back
        to a synchronous ``schedule()`` once ``prev`` is done.
        """
        if not prev.scheduled or len(prev.scheduled) != len(self.running) or prev.preempted:
            return None
        bm = self.block_manager
        bs = bm.block_size
        budget = self.config.max_num_batched_tokens
        plan: list[tuple[Request, int, int, bool]] = []  # (request, tokens in prev, tokens next, allocate?)
        needed = 0  # fresh blocks for prev's tokens (computed counts not advanced yet) and the next
        running = RequestStatus.RUNNING
        for req, k in prev.scheduled:
            if req.status is not running or not req.chainable or req.num_pending_tokens or req.num_inflight_tokens:
                return None
            after = req.num_computed_tokens + k  # where the next step starts
            ntok = len(req.all_token_ids)
            if after < ntok:  # prompt cut by prev: its next chunk
                n = min(ntok - after, budget)
            elif after == ntok:  # prev samples this request's next token
                if ntok + 1 >= req.max_model_len or (
                        req.max_tokens is not None and len(req.output_token_ids) + 1 >= req.max_tokens):
                    continue  # finishes with prev's token
                n = 1
            else:
                return None
            if n <= 0:
                break  # budget spent: later requests just wait a step, as in schedule()
            budget -= n
            total = after + n
            # As schedule()'s decode fast path: a token that lands inside a block already held and
            # does not fill it needs no allocate() (no new block, no block to register).
            alloc = n > 1 or total % bs == 0 or len(req.block_ids) * bs < total
            if alloc:
                needed += max(0, -(-total // bs) - len(req.block_ids))
            plan.append((req, k, n, alloc))
        if not plan or needed > bm.num_free_blocks:
            return None
        nxt: list[tuple[Request, int]] = []
        for req, k, n, alloc in plan:
            if alloc:
                bm.allocate(req, k + n)
            req.num_inflight_tokens = k
            if req.num_computed_tokens + k == len(req.all_token_ids):
                req.num_pending_tokens = 1
            nxt.append((req, n))
        budget = self._admit(nxt, budget)
        return SchedulerOutput(scheduled=nxt, num_batched_tokens=self.config.max_num_batched_tokens - budget)

    def _preempt(self, req: Request) -> None:
        self.block_manager.free_request(req)
        req.num_computed_tokens = 0
        req.pool_acc = None  # recomputed from the start
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int],
                           pooled: dict[str, object] | None = None) -> list[Request]:
        """Advance computed counts, append sampled tokens, finish requests; returns those that got a
        token, and pooling requests whose prompt is done (finished, their result in ``pooled``)."""
        updated: list[Request] = []
        for req, num_new in out.scheduled:
            if req.status.finished:  # stopped or aborted while this (chained) step was in flight
                continue
            req.num_computed_tokens += num_new
            req.num_inflight_tokens = 0
            if req.is_pooling:  # like a prompt with max_tokens=0: done once the prompt is computed
                if pooled is not None and req.request_id in pooled:
                    req.status = RequestStatus.FINISHED_STOPPED
                    updated.append(req)
                    self._finish(req)
                continue
            token = sampled.get(req.request_id)
            if token is None:  # a prompt chunk that did not reach the end of the prompt
                continue
            req.append_token(token)
            updated.append(req)
            if req.check_stop():
                self._finish(req)
        return updated

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        """Abort (or stop-string finish) requests from outside; frees their blocks at once."""
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.status.finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self._finish(req, already_removed=True)
            done.append(req)
        return done

    def _finish(self, req: Request, already_removed: bool = False) -> None:
        if not already_removed:
            self.running.remove(req)
        self.block_manager.free_request(req)
        del self.requests[req.request_id]
