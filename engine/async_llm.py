"""The async engine the server uses: front end in the caller's event loop, core in a child process.

``async for out in engine.generate(prompt, params, request_id)`` streams RequestOutputs;
``await engine.abort(request_id)`` drops a request and frees its KV blocks. Tokenisation,
detokenisation and stop strings run here; the child process only schedules and runs the model.

Nothing here blocks the event loop on the pipe to the core: requests are processed and pickled
in worker threads and written by a sender thread; a reader thread hands each step's outputs to
the loop in one callback, and each request's outputs wait merged in its
``RequestOutputCollector`` until its consumer takes them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Client
from typing import Any, ClassVar

from engine.config import EngineArgs
from engine.core_process import encode_msg, recv_msg, start_core_process
from engine.engine_core import EngineStats
from engine.output_collector import RequestOutputCollector
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
from engine.stats import (  # noqa: F401 (re-exported)
    FinishedRequestStats,
    IterationStats,
    RequestStatsTracker,
    StatLogger,
)


class EngineDeadError(RuntimeError):
    """The core process died; no request can be served any more."""


@dataclass(frozen=True)
class CoreAddress:
    """Where another API process attaches to a running engine core (``AsyncLLM(attach=...)``)."""

    address: str
    authkey: bytes


class AsyncLLM:
    # Factories ``f(async_llm) -> StatLogger`` applied to every AsyncLLM built in this process
    # (the server registers its Prometheus metrics here; see runtime/metrics.py).
    default_stat_loggers: ClassVar[list[Callable[[AsyncLLM], StatLogger]]] = []

    def __init__(self, engine_args: EngineArgs, start_timeout: float = 900.0,
                 stat_loggers: list[StatLogger] | None = None, attach: CoreAddress | None = None) -> None:
        """Start an engine core process, or with ``attach`` share the running one that another
        AsyncLLM (the head, see ``core_address``) started: this one then serves its own requests
        through it, and closing it (``shutdown``) leaves the core running."""
        self.engine_args = engine_args
        self.config = engine_args.create_engine_config()
        self.tokenizer = load_tokenizer(self.config)
        self.processor = InputProcessor(self.config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stats = EngineStats()
        self._queues: dict[str, RequestOutputCollector] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # pickled messages for the sender thread
        self._dead: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="vlmserve-preproc")
        self._proc: subprocess.Popen | None = None
        if attach is None:
            self._proc, self._conn, self._authkey = start_core_process(engine_args, timeout=120.0)
        else:
            self._conn, self._authkey = Client(attach.address, family="AF_UNIX", authkey=attach.authkey), attach.authkey
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
        self._tracker = RequestStatsTracker(self.output_processor, self.stat_loggers)
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name="vlmserve-core-reader")
        self._reader.start()
        self._sender = threading.Thread(target=self._send_loop, daemon=True, name="vlmserve-core-sender")
        self._sender.start()

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
        return self._dead is None and (self._proc is None or self._proc.poll() is None)

    @property
    def core_address(self) -> CoreAddress:
        """Where other API processes attach to this engine core."""
        return CoreAddress(self.info["frontend_address"], self._authkey)

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
        collector = RequestOutputCollector(delta=output_kind is OutputKind.DELTA)
        self._queues[request_id] = collector
        arrival = time.time()
        finished = failed = False
        try:
            # Tokenisation, image preprocessing and pickling run in worker threads, never on the loop.
            text, req, seconds, messages = await self._loop.run_in_executor(
                self._pool, self._timed_process, request_id, prompt, sampling_params
            )
            num_images = sum(1 for f in req.mm_features if getattr(f, "modality", None) == "image")
            if num_images:
                self._tracker.log("record_preprocess", num_images, seconds)
            self.output_processor.add_request(
                request_id, text, req.prompt_token_ids, {rid: m.sampling_params for rid, m in messages.items()},
                output_kind,
            )
            self._tracker.start(request_id, arrival, len(req.prompt_token_ids))
            for payload in messages.values():
                self._send_pickled(payload)
            while True:
                try:
                    item = await collector.get()
                except BaseException as exc:
                    failed = not isinstance(exc, asyncio.CancelledError)
                    raise
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._abort_now(request_id)
            self._tracker.end(request_id, aborted=not finished and not failed)

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
        collector = RequestOutputCollector(delta=False)
        self._queues[request_id] = collector
        finished = False
        try:
            text, req, _, messages = await self._loop.run_in_executor(
                self._pool, self._timed_process, request_id, prompt, pooling_params
            )
            self.output_processor.add_pooling_request(request_id, text, req.prompt_token_ids)
            for payload in messages.values():
                self._send_pickled(payload)
            item = await collector.get()
            finished = True
            yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._abort_now(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort_now(request_id)
        collector = self._queues.pop(request_id, None)
        if collector is not None:
            collector.put_error(asyncio.CancelledError(f"request {request_id} aborted"))

    def shutdown(self) -> None:
        """Stop the core (the head), or detach from it (an attached AsyncLLM: the core aborts this
        one's requests and serves on)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._proc is None:
            self._outbox.put(None)
            sender = getattr(self, "_sender", None)
            if sender is not None:
                sender.join(timeout=10)
            self._conn.close()
            return
        try:
            self._send(("shutdown",))
        except Exception:
            pass
        self._outbox.put(None)  # the sender thread ends after the shutdown message
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)
        self._conn.close()

    # -- plumbing -------------------------------------------------------------------------------
    def _timed_process(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams,
                       ) -> tuple[Any, Any, float, dict[str, Any]]:
        """(prompt text, EngineRequest, seconds, {core request id: (params, pickled "add" message)}):
        a request with n > 1 becomes n core requests (``split_children``). The pickling happens
        here, in the worker, so that a request's image bytes are never copied on the event loop."""
        t0 = time.perf_counter()
        text, req = self.processor.process(request_id, prompt, params)
        children = split_children(req) if req.sampling_params is not None else [req]
        messages = {c.request_id: _Pickled(c.sampling_params, encode_msg(("add", c))) for c in children}
        return text, req, time.perf_counter() - t0, messages

    def _send(self, msg: tuple) -> None:
        self._send_pickled(_Pickled(None, encode_msg(msg)))

    def _send_pickled(self, payload: "_Pickled") -> None:
        """Queue a pickled message for the sender thread (never blocks: the core reads its pipe
        in a thread of its own, and the order of messages is kept)."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        self._outbox.put(payload.data)

    def _send_loop(self) -> None:
        """Sender thread: writes queued messages to the core in order until a None."""
        while (data := self._outbox.get()) is not None:
            try:
                self._conn.send_bytes(data)
            except (OSError, ValueError):  # the core is gone (the reader reports it) or we shut down
                return

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
            except (EOFError, OSError, TypeError):  # TypeError: the connection was closed under us
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
            observed = self._tracker.observe(msg[1])
            ready, to_abort = self.output_processor.process(msg[1])
            self._tracker.record(observed)
            if to_abort:
                self._send(("abort", to_abort))
            for out in ready:
                collector = self._queues.get(out.request_id)
                if collector is None:
                    continue
                if isinstance(out, RequestError):
                    collector.put_error(EngineOutputError(out.message))
                else:
                    collector.put(out)
        elif kind in ("error", "failed"):  # refused (bad input) or failed in a step (internal)
            parent = self.output_processor.child_to_parent.get(msg[1], msg[1])
            self._abort_now(parent)
            collector = self._queues.get(parent)
            if collector is not None:
                collector.put_error(ValueError(msg[2]) if kind == "error" else EngineOutputError(msg[2]))
        elif kind == "fatal":
            self._dead = self._dead or msg[1]
            for collector in self._queues.values():
                collector.put_error(EngineDeadError(self._dead))


class _Pickled:
    """A message to the core, already pickled, and the sampling params of the request it adds."""

    __slots__ = ("data", "sampling_params")

    def __init__(self, sampling_params: Any, data: bytes) -> None:
        self.sampling_params = sampling_params
        self.data = data
