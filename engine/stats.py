"""Per-request serving statistics of the async engine, for stat loggers (the server's Prometheus
metrics in runtime/metrics.py). Timings are taken in the front end as core outputs arrive; the
core's own counters (preemptions, prefix-cache hits, KV usage) travel in ``EngineStats``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("vlmserve.engine")


@dataclass
class IterationStats:
    """What one message of core outputs (one engine step) produced, as seen by the front end."""

    num_prompt_tokens: int = 0  # prompts of the requests whose first token arrived in this step
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)  # seconds since arrival
    inter_token_latencies: list[float] = field(default_factory=list)  # seconds since the sample's last token


@dataclass
class FinishedRequestStats:
    """One request that finished (``finish_reasons``: one per sample) or was aborted (["abort"])."""

    finish_reasons: list[str]
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency: float | None = None  # None for an aborted request (its timings are not observed)
    queue_time: float = 0.0  # sent to the core -> first scheduled
    prefill_time: float = 0.0  # first scheduled -> first token
    decode_time: float = 0.0  # first token -> last token


class StatLogger:
    """Receives the engine's statistics; every method runs on the engine's event loop and must be quick."""

    def record_preprocess(self, num_images: int, seconds: float) -> None:
        """A request's multimodal preprocessing (``InputProcessor.process``) took ``seconds``."""

    def record_iteration(self, stats: IterationStats) -> None:
        """Once per message of core outputs."""

    def record_finished(self, stats: FinishedRequestStats) -> None:
        """Once per request, when it finishes or is aborted (not when it fails with an error)."""


@dataclass
class _RequestTiming:
    arrival: float  # time.time() when generate() was called
    num_prompt_tokens: int
    queued: float = 0.0  # sent to the core
    scheduled: float | None = None  # first scheduled (the core's clock: time.time())
    first_token: float | None = None
    last_token: float | None = None
    last_token_of: dict[str, float] = field(default_factory=dict)  # child id -> time of its last token
    state: Any = None  # the output processor's state of the request (finish reasons, token ids)

    @property
    def num_generated(self) -> int:
        return sum(len(s.token_ids) for s in self.state.seqs.values()) if self.state is not None else 0


class RequestStatsTracker:
    """Follows generate requests from arrival to finish and reports to the stat loggers."""

    def __init__(self, output_processor: Any, loggers: list[StatLogger]) -> None:
        self.output_processor = output_processor
        self.loggers = loggers
        self.timings: dict[str, _RequestTiming] = {}

    def log(self, method: str, *args: Any) -> None:
        for stat_logger in self.loggers:
            try:
                getattr(stat_logger, method)(*args)
            except Exception:  # metrics must never break serving
                logger.debug("stat logger %s failed", method, exc_info=True)

    def start(self, request_id: str, arrival: float, num_prompt_tokens: int) -> None:
        """The request was handed to the core (after ``output_processor.add_request``)."""
        if self.loggers:
            self.timings[request_id] = _RequestTiming(
                arrival, num_prompt_tokens, queued=time.time(), state=self.output_processor.requests.get(request_id)
            )

    def end(self, request_id: str, aborted: bool) -> None:
        """The request's stream closed; an unfinished one that did not fail counts as aborted."""
        timing = self.timings.pop(request_id, None)
        if timing is not None and aborted:
            self.log("record_finished", FinishedRequestStats(["abort"], timing.num_prompt_tokens, timing.num_generated))

    def observe(self, outputs: list) -> tuple[IterationStats, list[str]] | None:
        """Timings of a message of core outputs, taken BEFORE the output processor applies it."""
        if not self.timings:
            return None
        now = time.time()
        it = IterationStats()
        touched = []
        op = self.output_processor
        for out in outputs:
            parent = op.child_to_parent.get(out.request_id)
            timing = self.timings.get(parent) if parent is not None else None
            if timing is None or not out.new_token_ids:
                continue
            seq = timing.state.seqs.get(out.request_id) if timing.state is not None else None
            if seq is None or seq.finish_reason is not None:
                continue  # a stop string already ended it; the output processor drops this too
            touched.append(parent)
            if out.scheduled_time is not None and timing.scheduled is None:
                timing.scheduled = out.scheduled_time
            it.num_generation_tokens += len(out.new_token_ids)
            last = timing.last_token_of.get(out.request_id)
            if last is None:
                if timing.first_token is None:
                    timing.first_token = now
                    it.num_prompt_tokens += timing.num_prompt_tokens
                    it.time_to_first_tokens.append(now - timing.arrival)
            else:
                it.inter_token_latencies.append(now - last)
            timing.last_token_of[out.request_id] = now
            timing.last_token = now
        return it, touched

    def record(self, observed: tuple[IterationStats, list[str]] | None) -> None:
        """After the output processor applied the message: report the step and finished requests."""
        if observed is None:
            return
        it, touched = observed
        self.log("record_iteration", it)
        now = time.time()
        for rid in dict.fromkeys(touched):
            timing = self.timings.get(rid)
            if timing is None or timing.state is None or not timing.state.finished:
                continue
            del self.timings[rid]
            first = timing.first_token if timing.first_token is not None else now
            scheduled = timing.scheduled if timing.scheduled is not None else timing.queued
            self.log("record_finished", FinishedRequestStats(
                [s.finish_reason for s in sorted(timing.state.seqs.values(), key=lambda s: s.index)],
                timing.num_prompt_tokens, timing.num_generated,
                e2e_latency=max(0.0, now - timing.arrival),
                queue_time=max(0.0, scheduled - timing.queued),
                prefill_time=max(0.0, first - max(scheduled, timing.queued)),
                decode_time=max(0.0, (timing.last_token or first) - first),
            ))
