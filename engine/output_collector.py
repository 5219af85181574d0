"""Where one request's outputs wait for its consumer (a stream writer, a gather loop).

The front end's reader hands each engine step's outputs to every request at once; a consumer
that is behind (its event loop was busy writing other streams) then finds several outputs of its
request waiting. An ``asyncio.Queue`` would make it write them one by one, each as its own
chunk, so a front end that falls behind the engine stays behind and every stream turns into
bursts. Here a new output is merged into the one still waiting: deltas are concatenated,
cumulative and final outputs replace it. A consumer that keeps up sees one output per step; one
that is behind catches up with one write, as vLLM's ``RequestOutputCollector`` does.
"""

from __future__ import annotations

import asyncio

from engine.outputs import CompletionOutput, RequestOutput


def merge_delta(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """Two consecutive DELTA outputs of one request as one: each sample's new text, token ids and
    logprobs concatenated; finish state, cumulative logprob and counters from the newer."""
    by_index: dict[int, CompletionOutput] = {c.index: c for c in older.outputs}
    for c in newer.outputs:
        prev = by_index.get(c.index)
        if prev is None:
            by_index[c.index] = c
            continue
        prev.text += c.text
        prev.token_ids = prev.token_ids + c.token_ids
        if c.logprobs is not None:
            prev.logprobs = (prev.logprobs or []) + c.logprobs
        prev.cumulative_logprob = c.cumulative_logprob
        prev.finish_reason, prev.stop_reason = c.finish_reason, c.stop_reason
    older.outputs = sorted(by_index.values(), key=lambda c: c.index)
    older.finished = newer.finished
    older.num_cached_tokens = newer.num_cached_tokens
    older.prompt_logprobs = older.prompt_logprobs if older.prompt_logprobs is not None else newer.prompt_logprobs
    return older


class RequestOutputCollector:
    """One request's pending output (merged while unread) and terminal error, for one consumer.

    ``put``/``put_error`` are called on the event loop's thread; ``get`` returns the pending
    output, or raises the error once every output before it was taken."""

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, out: RequestOutput) -> None:
        if self._pending is None or not self.delta:
            self._pending = out  # cumulative / final outputs: the newest says everything
        else:
            self._pending = merge_delta(self._pending, out)
        self._ready.set()

    def put_error(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._ready.set()

    async def get(self) -> RequestOutput:
        while self._pending is None and self._error is None:
            await self._ready.wait()
        return self._take()

    def get_nowait(self) -> RequestOutput | None:
        return self._take() if self._pending is not None or self._error is not None else None

    def _take(self) -> RequestOutput:
        out, self._pending = self._pending, None
        if out is None:
            raise self._error  # type: ignore[misc]  (checked by the callers)
        if self._error is None:
            self._ready.clear()
        return out
