"""The offline API: ``LLM(model=...).generate(...)`` and ``.chat(...)``, shaped like vLLM's.

It runs the engine core in this process. ``generate`` processes prompts (tokens, image
preprocessing) while the engine steps, so the host's front-end work overlaps the device; a bad
prompt aborts everything the call queued before the error is raised.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from engine.config import EngineArgs
from engine.engine_core import EngineCore
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
        feeder = _Feeder(self, zip(prompt_list, params_list), len(prompt_list))
        feeder.feed(self.FIRST_FEED)
        feeder.raise_if_failed()
        return self._run(feeder.order, use_tqdm and not single, feeder)

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
        prompts = [self.processor.chat_prompt(c, self.media_loader, chat_template, add_generation_prompt)
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
        finally:
            if bar is not None:
                bar.close()
        errors = [r for r in results.values() if isinstance(r, RequestError)]
        if errors:
            raise EngineOutputError(f"request {errors[0].request_id}: {errors[0].message}")
        return [results[rid] for rid in order]


class _Feeder:
    """Processes prompts (tokenise, preprocess images) and queues them while the engine runs.

    ``feed(n)`` processes up to n more now; ``idle()`` is handed to ``EngineCore.step`` and runs
    while the device computes a step, feeding a few more when the waiting queue runs short. A
    processing error is kept (``error``) and stops feeding: the caller aborts what was queued and
    raises it, so a bad prompt leaves nothing behind, as if it had been rejected up front.
    """

    PER_IDLE = 64  # enough to fill the next prefill step of a busy engine

    def __init__(self, llm: LLM, items: Any, total: int) -> None:
        self.llm = llm
        self.items = iter(items)
        self.total = total
        self.order: list[str] = []
        self.pending = total > 0
        self.error: Exception | None = None

    def feed(self, n: int) -> None:
        llm = self.llm
        try:
            for _ in range(n):
                item = next(self.items, None)
                if item is None:
                    self.pending = False
                    return
                text, req = llm.processor.process(str(next(llm._counter)), *item)
                llm._add(text, req, OutputKind.FINAL_ONLY)
                self.order.append(req.request_id)
        except Exception as exc:  # noqa: BLE001 - re-raised by the caller after cleaning up
            self.error = exc
            self.pending = False
        if self.error is None and len(self.order) == self.total:
            self.pending = False

    def idle(self) -> None:
        sched = self.llm.core.scheduler
        if self.pending and len(sched.waiting) < sched.config.max_num_seqs:
            self.feed(self.PER_IDLE)

    def raise_if_failed(self) -> None:
        """After a processing error: abort what this call queued, then raise the error."""
        if self.error is not None:
            self.llm._abort_all(self.order)
            raise self.error
