"""The offline API: ``LLM(model=...).generate(...)`` and ``.chat(...)``, shaped like vLLM's.

It runs the engine core in this process. ``generate`` processes prompts (tokens, image
preprocessing) while the engine steps, so the host's front-end work overlaps the device; a bad
prompt aborts everything the call queued before the error is raised.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from engine.config import EngineArgs
from engine.engine_core import EngineCore, StepError
from engine.media import MediaLoader
from engine.output_processor import OutputKind, OutputProcessor
from engine.outputs import (
    EngineOutputError,
    PoolingRequestOutput,
    RequestError,
    RequestOutput,
)
from engine.pooling_params import PoolingParams
from engine.processor import InputProcessor, PromptType, load_tokenizer, split_children
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    """An engine for offline batched inference.

    ``LLM(model=PATH_OR_HF_ID, dtype="auto", device="auto", max_model_len=None, max_num_seqs=256,
    max_num_batched_tokens=None, block_size=16, enable_prefix_caching=True,
    gpu_memory_utilization=0.9, seed=0, ...)`` — see ``EngineArgs`` for every option.
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.config = self.engine_args.create_engine_config()
        self.tokenizer = load_tokenizer(self.config)
        self.processor = InputProcessor(self.config, self.tokenizer)
        self.core = EngineCore(self.config)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.media_loader = MediaLoader(self.engine_args.media_config())
        self._counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list; returns one RequestOutput per prompt, in order."""
        single = isinstance(prompts, (str, dict))
        prompt_list = [prompts] if single else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"sampling_params: got {len(params_list)} for {len(prompt_list)} prompts; give one or one per prompt"
                )
        if self.config.model.is_pooling:
            raise ValueError("generate: this engine serves embeddings (task='embed'); use embed()")
        # Prompts are processed (tokens, images) and queued while the engine runs: the first few
        # before the first step, the rest while the device computes (see _Feeder). A bad prompt
        # aborts everything this call queued, then raises.
        feeder = _Feeder(self, zip(prompt_list, params_list), len(prompt_list), self.preprocess_workers)
        try:
            feeder.feed(self.FIRST_FEED)
            feeder.raise_if_failed()
            return self._run(feeder.order, use_tqdm and not single, feeder)
        finally:
            feeder.close()

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[PoolingRequestOutput]:
        """Embed one prompt or a list (the engine must have task="embed"); one PoolingRequestOutput
        per prompt, in order, whose ``outputs.embedding`` is the pooled hidden state. Raises
        EngineOutputError if an embedding is not finite (NaN / inf)."""
        single = isinstance(prompts, (str, dict))
        prompt_list = [prompts] if single else list(prompts)
        if pooling_params is None:
            pooling_params = PoolingParams()
        if isinstance(pooling_params, PoolingParams):
            params_list = [pooling_params] * len(prompt_list)
        else:
            params_list = list(pooling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"pooling_params: got {len(params_list)} for {len(prompt_list)} prompts; give one or one per prompt"
                )
        if not self.config.model.is_pooling:
            raise ValueError("embed: this engine serves generation; create it with LLM(..., task='embed')")
        processed = [
            self.processor.process(str(next(self._counter)), p, pp) for p, pp in zip(prompt_list, params_list)
        ]
        order = []
        for text, req in processed:
            self.output_processor.add_pooling_request(req.request_id, text, req.prompt_token_ids)
            self.core.add_request(req)
            order.append(req.request_id)
        return self._run(order, use_tqdm and not single)

    def encode(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[PoolingRequestOutput]:
        """The same as ``embed``."""
        return self.embed(prompts, pooling_params, use_tqdm)

    def chat(
        self,
        messages: Conversation | list[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the chat template (the tokenizer's, or ``chat_template``) and generate.

        Message content is a string or OpenAI-style parts (text, image_url with data:/http(s)/file
        URLs, or {"type": "image", "image": PIL.Image}), interleaved in any order."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        # Each conversation is one request: its images share one pixel budget
        # (max_request_image_pixels), as they do on the server.
        prompts = [self.processor.chat_prompt(c, self.media_loader.for_request(), chat_template, add_generation_prompt)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm and len(prompts) > 1)

    def _abort_all(self, order: list[str]) -> None:
        """Abort every request of this call (and wait out a step still in flight)."""
        children = [c for rid in order for c in self.output_processor.child_ids(rid)]
        self.core.abort_requests(children)
        for rid in order:
            self.output_processor.abort(rid)
        while self.core.has_unfinished():
            self.core.step()

    def _add(self, prompt: str | None, req: EngineRequest, kind: OutputKind) -> None:
        children = split_children(req)
        self.output_processor.add_request(
            req.request_id, prompt, req.prompt_token_ids, {c.request_id: c.sampling_params for c in children}, kind
        )
        for child in children:
            p = child.sampling_params
            if kind == OutputKind.FINAL_ONLY and not p.stop and p.logprobs is None and p.prompt_logprobs is None:
                # no stop strings to watch, nothing per token: one report from the core at the end
                child = replace(child, final_only=True)
            self.core.add_request(child)

    # Prompts processed before the first engine step; the rest are fed in between and during steps.
    FIRST_FEED = 32
    # Threads that process prompts for generate() ahead of the engine; 0 (the default): on the
    # calling thread, between and during steps. Worker threads contend for the GIL with the
    # thread launching the steps: on the H100, W1 with 8 of them took 4.49 s against 3.39 s
    # without (bench/gpu_throughput.py --w1-compare-workers 0), so they are opt-in.
    preprocess_workers: int = 0

    def _run(self, order: list[str], use_tqdm: bool, feeder: "_Feeder | None" = None) -> list[Any]:
        results: dict[str, Any] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=feeder.total if feeder is not None else len(order), desc="Processed prompts",
                       dynamic_ncols=True)
        try:
            while self.core.has_unfinished() or (feeder is not None and feeder.pending):
                if feeder is not None and feeder.pending and not self.core.has_unfinished():
                    feeder.feed(self.FIRST_FEED)  # nothing to overlap with: feed now
                outputs = self.core.step(idle=feeder.idle if feeder is not None and feeder.pending else None)
                if feeder is not None:
                    feeder.raise_if_failed()
                ready, to_abort = self.output_processor.process(outputs)
                if to_abort:
                    self.core.abort_requests(to_abort)
                for out in ready:
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except StepError:
            self._abort_all(order)  # the step's requests are gone already: drop the rest of the call too
            raise
        finally:
            if bar is not None:
                bar.close()
        errors = [r for r in results.values() if isinstance(r, RequestError)]
        if errors:
            raise EngineOutputError(f"request {errors[0].request_id}: {errors[0].message}")
        return [results[rid] for rid in order]


class _Feeder:
    """Processes prompts (tokenise, preprocess images) and queues them while the engine runs.

    With ``workers`` > 0 (opt-in, ``LLM.preprocess_workers``), a thread pool processes prompts
    ahead of the engine; results are queued in prompt order, on this thread, since the engine is
    single-threaded. The workers' Python holds the GIL against the thread launching the steps,
    which measured slower on the H100 than 0 workers: every prompt processed on this thread, in
    ``feed``.

    ``feed(n)`` queues up to n more, waiting for them; ``idle()`` is handed to ``EngineCore.step``
    and runs while the device computes a step: it queues what is ready (with workers) or processes
    a few more (without) when the waiting queue runs short. A processing error is kept (``error``)
    and stops feeding: the caller aborts what was queued and raises it, so a bad prompt leaves
    nothing behind, as if it had been rejected up front.
    """

    PER_IDLE = 64  # enough to fill the next prefill step of a busy engine

    def __init__(self, llm: LLM, items: Any, total: int, workers: int = 0) -> None:
        self.llm = llm
        self.items = iter(items)
        self.total = total
        self.order: list[str] = []
        self.pending = total > 0
        self.error: Exception | None = None
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="vlmserve-feed") if workers > 0 and total > 1 else None
        # processed ahead of the engine, in prompt order; bounded so images are not all held at once
        self.ahead: deque[Future] = deque()
        self.max_ahead = max(self.PER_IDLE, llm.config.scheduler.max_num_seqs)
        self._submit()

    def _submit(self) -> None:
        while self.pool is not None and len(self.ahead) < self.max_ahead:
            item = next(self.items, None)
            if item is None:
                return
            self.ahead.append(self.pool.submit(self.llm.processor.process, str(next(self.llm._counter)), *item))

    def _next(self, wait: bool) -> tuple[str | None, EngineRequest] | None:
        """The next processed prompt (None when there is none, or it is not ready and not wait)."""
        if self.pool is None:
            item = next(self.items, None)
            return None if item is None else self.llm.processor.process(str(next(self.llm._counter)), *item)
        if not self.ahead or (not wait and not self.ahead[0].done()):
            return None
        result = self.ahead.popleft().result()
        self._submit()
        return result

    def feed(self, n: int, wait: bool = True) -> None:
        llm = self.llm
        try:
            for _ in range(n):
                got = self._next(wait)
                if got is None:
                    break
                text, req = got
                llm._add(text, req, OutputKind.FINAL_ONLY)
                self.order.append(req.request_id)
        except Exception as exc:  # noqa: BLE001 - re-raised by the caller after cleaning up
            self.error = exc
        if self.error is not None or len(self.order) == self.total:
            self.close()

    def idle(self) -> None:
        sched = self.llm.core.scheduler
        if self.pending and len(sched.waiting) < sched.config.max_num_seqs:
            self.feed(self.PER_IDLE, wait=False)

    def close(self) -> None:
        """Stop feeding: drop what was processed ahead and not queued, end the workers."""
        self.pending = False
        if self.pool is not None:
            for fut in self.ahead:
                fut.cancel()
            self.ahead.clear()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def raise_if_failed(self) -> None:
        """After a processing error: abort what this call queued, then raise the error."""
        if self.error is not None:
            self.llm._abort_all(self.order)
            raise self.error
