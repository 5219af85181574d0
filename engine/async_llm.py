"""The async engine the server uses: front end in the caller's event loop, core in a child process.

``async for out in engine.generate(prompt, params, request_id)`` streams RequestOutputs;
``await engine.abort(request_id)`` drops a request and frees its KV blocks. Tokenisation,
detokenisation and stop strings run here; the child process only schedules and runs the model.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.config import EngineArgs
from engine.core_process import recv_msg, send_msg, start_core_process
from engine.engine_core import EngineStats
from engine.output_processor import OutputKind, OutputProcessor
from engine.outputs import (
    EngineOutputError,
    PoolingRequestOutput,
    RequestError,
    RequestOutput,
)
from engine.pooling_params import PoolingParams
from engine.processor import InputProcessor, PromptType, load_tokenizer, split_children
from engine.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The core process died; no request can be served any more."""


# -- per-request statistics for stat loggers (e.g. the server's Prometheus metrics) --------------
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


class AsyncLLM:
    # Factories ``f(async_llm) -> StatLogger`` applied to every AsyncLLM built in this process
    # (the server registers its Prometheus metrics here; see runtime/metrics.py).
    default_stat_loggers: ClassVar[list[Callable[[AsyncLLM], StatLogger]]] = []

    def __init__(self, engine_args: EngineArgs, start_timeout: float = 900.0,
                 stat_loggers: list[StatLogger] | None = None) -> None:
        self.engine_args = engine_args
        self.config = engine_args.create_engine_config()
        self.tokenizer = load_tokenizer(self.config)
        self.processor = InputProcessor(self.config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stats = EngineStats()
        self._timings: dict[str, _RequestTiming] = {}
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_lock = threading.Lock()
        self._dead: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="vlmserve-preproc")
        self._proc, self._conn = start_core_process(engine_args, timeout=120.0)
        try:
            if not self._conn.poll(start_timeout):
                raise RuntimeError(f"engine core did not start within {start_timeout:.0f} s")
            msg = recv_msg(self._conn)
        except (EOFError, OSError, RuntimeError) as exc:
            self.shutdown()
            raise RuntimeError(f"engine core failed to start: {exc}") from exc
        if msg[0] != "ready":
            self.shutdown()
            raise RuntimeError(f"engine core failed to start: {msg[1]}")
        self.info: dict[str, Any] = msg[1]
        self.stat_loggers: list[StatLogger] = list(stat_loggers or [])
        for factory in type(self).default_stat_loggers:
            try:
                self.stat_loggers.append(factory(self))
            except Exception:  # metrics must never stop the engine from serving
                logging.getLogger("vlmserve.engine").exception("a stat logger could not be created")
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name="vlmserve-core-reader")
        self._reader.start()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "AsyncLLM":
        return cls(engine_args)

    # -- public API -----------------------------------------------------------------------------
    @property
    def is_pooling(self) -> bool:
        """Whether the engine serves embeddings (task="embed") rather than generation."""
        return self.config.model.is_pooling

    @property
    def is_running(self) -> bool:
        return self._dead is None and self._proc.poll() is None

    def num_unfinished(self) -> int:
        return len(self._queues)

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request; leaving the loop early (or being cancelled) aborts it."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if request_id in self._queues:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        arrival = time.time()
        finished = failed = False
        try:
            # Tokenisation and image preprocessing run in worker threads, never on the event loop.
            text, req, seconds = await self._loop.run_in_executor(
                self._pool, self._timed_process, request_id, prompt, sampling_params
            )
            num_images = sum(1 for f in req.mm_features if getattr(f, "modality", None) == "image")
            if num_images:
                self._log("record_preprocess", num_images, seconds)
            children = split_children(req)
            self.output_processor.add_request(
                request_id, text, req.prompt_token_ids, {c.request_id: c.sampling_params for c in children}, output_kind
            )
            if self.stat_loggers:
                self._timings[request_id] = _RequestTiming(
                    arrival, len(req.prompt_token_ids), queued=time.time(),
                    state=self.output_processor.requests.get(request_id))
            for child in children:
                self._send(("add", child))
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    failed = not isinstance(item, asyncio.CancelledError)
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            timing = self._timings.pop(request_id, None)
            if not finished:
                self._abort_now(request_id)
                if timing is not None and not failed:
                    self._log("record_finished", FinishedRequestStats(
                        ["abort"], timing.num_prompt_tokens, self._num_generated(timing)))

    async def encode(
        self,
        prompt: PromptType,
        pooling_params: PoolingParams | None,
        request_id: str,
    ) -> AsyncIterator[PoolingRequestOutput]:
        """Embed one prompt (the engine must have task="embed"): yields one final
        PoolingRequestOutput. Leaving early (or being cancelled) aborts the request; a non-finite
        embedding raises EngineOutputError."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if request_id in self._queues:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        if pooling_params is None:
            pooling_params = PoolingParams()
        self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            text, req, _ = await self._loop.run_in_executor(
                self._pool, self._timed_process, request_id, prompt, pooling_params
            )
            self.output_processor.add_pooling_request(request_id, text, req.prompt_token_ids)
            self._send(("add", req))
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            finished = True
            yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._abort_now(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort_now(request_id)
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(asyncio.CancelledError(f"request {request_id} aborted"))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            self._send(("shutdown",))
        except Exception:
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)
        self._conn.close()

    # -- plumbing -------------------------------------------------------------------------------
    def _timed_process(self, request_id: str, prompt: PromptType,
                       params: SamplingParams | PoolingParams) -> tuple[Any, Any, float]:
        t0 = time.perf_counter()
        text, req = self.processor.process(request_id, prompt, params)
        return text, req, time.perf_counter() - t0

    def _log(self, method: str, *args: Any) -> None:
        for logger in self.stat_loggers:
            try:
                getattr(logger, method)(*args)
            except Exception:  # metrics must never break serving
                logging.getLogger("vlmserve.engine").debug("stat logger %s failed", method, exc_info=True)

    @staticmethod
    def _num_generated(timing: _RequestTiming) -> int:
        state = timing.state
        return sum(len(s.token_ids) for s in state.seqs.values()) if state is not None else 0

    def _observe_outputs(self, outputs: list) -> tuple[IterationStats, list[str]]:
        """Timings of a message of core outputs, taken before the output processor applies it;
        returns the step's stats and the requests it touched."""
        now = time.time()
        it = IterationStats()
        touched = []
        op = self.output_processor
        for out in outputs:
            parent = op.child_to_parent.get(out.request_id)
            timing = self._timings.get(parent) if parent is not None else None
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

    def _finish_timings(self, touched: list[str]) -> None:
        now = time.time()
        for rid in dict.fromkeys(touched):
            timing = self._timings.get(rid)
            if timing is None or timing.state is None or not timing.state.finished:
                continue
            del self._timings[rid]
            first = timing.first_token if timing.first_token is not None else now
            scheduled = timing.scheduled if timing.scheduled is not None else timing.queued
            self._log("record_finished", FinishedRequestStats(
                [s.finish_reason for s in sorted(timing.state.seqs.values(), key=lambda s: s.index)],
                timing.num_prompt_tokens, self._num_generated(timing),
                e2e_latency=max(0.0, now - timing.arrival),
                queue_time=max(0.0, scheduled - timing.queued),
                prefill_time=max(0.0, first - max(scheduled, timing.queued)),
                decode_time=max(0.0, (timing.last_token or first) - first),
            ))

    def _send(self, msg: tuple) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        with self._send_lock:
            send_msg(self._conn, msg)

    def _abort_now(self, request_id: str) -> None:
        child_ids = self.output_processor.child_ids(request_id)
        self.output_processor.abort(request_id)
        if child_ids and self._dead is None:
            try:
                self._send(("abort", child_ids))
            except (OSError, EngineDeadError):
                pass

    def _read_loop(self) -> None:
        """Reader thread: hands every message from the core to the event loop."""
        while True:
            try:
                msg = recv_msg(self._conn)
            except (EOFError, OSError):
                msg = ("fatal", "engine core process exited")
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._on_message, msg)
            elif msg[0] == "outputs":
                self.stats = msg[2]
            if msg[0] == "fatal":
                self._dead = self._dead or msg[1]
                return

    def _on_message(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "outputs":
            self.stats = msg[2]
            observed = self._observe_outputs(msg[1]) if self._timings else None
            ready, to_abort = self.output_processor.process(msg[1])
            if observed is not None:
                self._log("record_iteration", observed[0])
                self._finish_timings(observed[1])
            if to_abort:
                self._send(("abort", to_abort))
            for out in ready:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(EngineOutputError(out.message) if isinstance(out, RequestError) else out)
        elif kind == "error":
            parent = self.output_processor.child_to_parent.get(msg[1], msg[1])
            self._abort_now(parent)
            queue = self._queues.get(parent)
            if queue is not None:
                queue.put_nowait(ValueError(msg[2]))
        elif kind == "fatal":
            self._dead = self._dead or msg[1]
            for queue in self._queues.values():
                queue.put_nowait(EngineDeadError(self._dead))
