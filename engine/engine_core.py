"""The engine core: scheduler + block manager + model runner, stepped in one loop.

The offline ``LLM`` drives it in-process; ``AsyncLLM`` runs it in a child process
(``engine.core_process``) so the server's event loop never waits on a model step.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.model_runner import ModelRunner, RunnerOutput, StepHandle
from engine.request import EngineRequest, Request, RequestStatus
from engine.sampler import TokenLogprob
from engine.scheduler import Scheduler, SchedulerOutput
from engine.warmup import warm_up_vision


@dataclass
class EngineCoreOutput:
    """What one step produced for one request (new tokens only)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[list[TokenLogprob]] | None = None
    prompt_logprobs: list | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # Wall-clock time (time.time()) the scheduler first scheduled the request; set on its first
    # output only (the front end's queue / prefill time metrics).
    scheduled_time: float | None = None
    # A pooling request's result (fp32 CPU tensor), on its one and final output.
    pooled: Any = None


@dataclass
class EngineStats:
    """A snapshot for metrics (vLLM's names in runtime/metrics.py map onto these)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    num_blocks: int = 0
    step_time: float = 0.0
    extra: dict = field(default_factory=dict)


class StepError(RuntimeError):
    """A step raised (its cause is ``__cause__``). The requests it ran are finished already
    (aborted: KV blocks and encoder cache freed) and listed in ``request_ids``, for the caller to
    fail; the engine serves the others on."""

    def __init__(self, request_ids: list[str]) -> None:
        super().__init__(f"an engine step failed; its {len(request_ids)} request(s) were aborted")
        self.request_ids = request_ids


def freeze_heap() -> None:
    """Move every object alive now (torch, transformers, the model's modules, the tokenizer:
    ~0.5M objects) out of the cyclic garbage collector's sight, as vLLM does once its engine is up.
    Otherwise each full collection, triggered by the allocations of serving, walks all of them
    while the device waits: ~0.2 s on the GPU machine's host, seen as a 208 ms idle device in one
    W1 step on the H200 (bench/gpu_throughput.py's device trace)."""
    gc.collect()
    gc.freeze()


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        needed = self.block_manager.blocks_needed(config.scheduler.max_model_len)
        if needed > self.block_manager.num_usable_blocks:
            raise ValueError(
                f"max_model_len: {config.scheduler.max_model_len} tokens need {needed} KV blocks but only "
                f"{self.block_manager.num_usable_blocks} fit; lower max_model_len or give the cache more memory"
            )
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self._aborted: list[EngineCoreOutput] = []
        self.last_step_time = 0.0
        # Async scheduling: the chained step launched by the previous step() call, if any.
        self._inflight: tuple[SchedulerOutput, StepHandle] | None = None
        self.async_scheduling = config.scheduler.async_scheduling
        # The scheduler outputs of the step being run: the requests to fail if it raises.
        self._in_step: list[SchedulerOutput] = []
        warm_up_vision(self)
        freeze_heap()

    def add_request(self, req: EngineRequest) -> None:
        if not req.prompt_token_ids:
            raise ValueError("prompt: must contain at least one token")
        limit = self.config.scheduler.max_model_len
        if req.pooling_params is not None and not self.config.model.is_pooling:
            raise ValueError("pooling_params: this engine serves generation (task='generate'), not embeddings")
        if req.pooling_params is None and self.config.model.is_pooling:
            raise ValueError("sampling_params: this engine serves embeddings (task='embed'), not generation")
        if req.pooling_params is not None and len(req.prompt_token_ids) > limit:
            raise ValueError(f"prompt: {len(req.prompt_token_ids)} tokens exceed max_model_len={limit}")
        if req.pooling_params is None and len(req.prompt_token_ids) >= limit:
            raise ValueError(
                f"prompt: {len(req.prompt_token_ids)} tokens leave no room to generate within "
                f"max_model_len={self.config.scheduler.max_model_len}"
            )
        if req.request_id in self.scheduler.requests:
            raise ValueError(f"request_id: {req.request_id!r} is already running")
        request = Request(req, limit, self.config.model.pooling_type)
        if req.sampling_params is not None and req.sampling_params.seed is not None:
            # Here rather than in a step: a seed torch refuses fails this request alone (a
            # ValueError naming the seed), not the batch it would have joined.
            request.generator = self.runner.sampler.make_generator(req.sampling_params.seed)
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        for req in self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED):
            self.runner.encoder_cache.release(req.request_id)
            self._aborted.append(EngineCoreOutput(req.request_id, [], finish_reason="abort"))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted) or self._inflight is not None

    def step(self, idle: Callable[[], None] | None = None) -> list[EngineCoreOutput]:
        """Run one step and return what it produced.

        With async scheduling, a step's successor is scheduled and launched before the step's own
        tokens are read back (see ``Scheduler.schedule_next``), so the host's scheduling, input preparation and output handling
        overlap the device; the successor is collected by the next call. ``idle`` runs on the host
        while the device computes (before this step's tokens are waited for): e.g. the offline
        front end processing more prompts.

        If the step raises, its requests are aborted and ``StepError`` names them: one failing
        step (a bug, a request the validation let through) must not take down the engine."""
        outputs, self._aborted = self._aborted, []
        self._in_step = []
        try:
            return outputs + self._step(idle)
        except Exception as exc:
            self._aborted = outputs + self._aborted  # still owed to the front end
            raise StepError(self._fail_step()) from exc

    def _fail_step(self) -> list[str]:
        """Abort the requests of the step that raised (every request if it raised before one was
        scheduled: the scheduler itself failed) and return their ids. Their outputs of this step
        are lost, so even those that finished in it are reported."""
        self._inflight = None  # a chained successor reads the failed step's tokens
        if self._in_step:
            ids = list(dict.fromkeys(req.request_id for out in self._in_step for req, _ in out.scheduled))
        else:
            ids = list(self.scheduler.requests)
        self._in_step = []
        for req in self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED):
            self.runner.encoder_cache.release(req.request_id)
        return ids

    def _step(self, idle: Callable[[], None] | None) -> list[EngineCoreOutput]:
        t0 = time.perf_counter()
        if self._inflight is not None:
            sched_out, handle = self._inflight
            self._inflight = None
            self._in_step.append(sched_out)
        else:
            sched_out = self.scheduler.schedule()
            if sched_out.is_empty:
                return []
            self._in_step.append(sched_out)
            handle = self.runner.launch(sched_out)
        # A step with prompt tokens keeps the device busy long enough to run ``idle`` first, so
        # that what it queues (more prompts) can join the successor; a decode step is too short:
        # the successor is launched first, so that the device has work queued while idle runs.
        # (Running idle after the successor whenever prompts already wait, feeding 128 at a time,
        # measured slower on the H100: W1 18.3-19.0k out tok/s against 19.8k in one process.)
        idle_first = idle is not None and sched_out.num_batched_tokens > len(sched_out.scheduled)
        if idle_first:
            idle()
        if self.async_scheduling:
            nxt = self.scheduler.schedule_next(sched_out)
            if nxt is not None:
                self._in_step.append(nxt)
                self._inflight = (nxt, self.runner.launch(nxt, prev=handle))
        if idle is not None and not idle_first:
            idle()
        result = self.runner.collect(handle)
        self.last_step_time = time.perf_counter() - t0
        outputs = self._process(sched_out, result)
        self._in_step = []
        return outputs

    def _process(self, sched_out: SchedulerOutput, result: RunnerOutput) -> list[EngineCoreOutput]:
        """Advance the scheduler with a step's results; one output per request that got a token."""
        outputs: list[EngineCoreOutput] = []
        for rid in sched_out.preempted:
            self.runner.encoder_cache.release(rid)
        for req in self.scheduler.update_from_output(sched_out, result.sampled, result.pooled):
            if req.status.finished and req.mm_features:
                self.runner.encoder_cache.release(req.request_id)
            if req.is_pooling:
                outputs.append(EngineCoreOutput(
                    request_id=req.request_id, new_token_ids=[], finish_reason=req.status.value,
                    num_cached_tokens=req.num_cached_tokens, scheduled_time=req.first_scheduled_time,
                    pooled=result.pooled[req.request_id]))
                continue
            if req.final_only:
                if req.status.finished:  # everything at once: the front end reads nothing earlier
                    outputs.append(EngineCoreOutput(
                        request_id=req.request_id, new_token_ids=list(req.output_token_ids),
                        finish_reason=req.status.value, stop_reason=req.stop_reason,
                        num_cached_tokens=req.num_cached_tokens, scheduled_time=req.first_scheduled_time))
                continue
            lp = result.logprobs.get(req.request_id)
            first = req.num_output_tokens == 1
            outputs.append(
                EngineCoreOutput(
                    request_id=req.request_id,
                    new_token_ids=[req.output_token_ids[-1]],
                    new_logprobs=[lp] if lp is not None else None,
                    prompt_logprobs=req.prompt_logprobs_acc if first and req.wants_prompt_logprobs else None,
                    finish_reason=req.status.value if req.status.finished else None,
                    stop_reason=req.stop_reason,
                    num_cached_tokens=req.num_cached_tokens,
                    scheduled_time=req.first_scheduled_time if first else None,
                )
            )
        return outputs

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage(),
            num_preemptions=self.scheduler.num_preemptions,
            prefix_queries=bm.num_queried_tokens,
            prefix_hits=bm.num_hit_tokens,
            num_blocks=bm.num_usable_blocks,
            step_time=self.last_step_time,
        )
