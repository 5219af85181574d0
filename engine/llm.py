"""The offline API: ``LLM(model=...).generate(...)`` and ``.chat(...)``, shaped like vLLM's.

It runs the engine core in this process: requests are validated and tokenised up front (so a
bad prompt fails before anything is queued), then the core is stepped until all are done.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
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
        # Validate and tokenise everything before queuing anything.
        processed = [
            self.processor.process(str(next(self._counter)), p, sp) for p, sp in zip(prompt_list, params_list)
        ]
        order = []
        for text, req in processed:
            self._add(text, req, OutputKind.FINAL_ONLY)
            order.append(req.request_id)
        return self._run(order, use_tqdm and not single)

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

    def _add(self, prompt: str | None, req: EngineRequest, kind: OutputKind) -> None:
        children = split_children(req)
        self.output_processor.add_request(
            req.request_id, prompt, req.prompt_token_ids, {c.request_id: c.sampling_params for c in children}, kind
        )
        for child in children:
            self.core.add_request(child)

    def _run(self, order: list[str], use_tqdm: bool) -> list[Any]:
        results: dict[str, Any] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc="Processed prompts", dynamic_ncols=True)
        while self.core.has_unfinished():
            ready, to_abort = self.output_processor.process(self.core.step())
            if to_abort:
                self.core.abort_requests(to_abort)
            for out in ready:
                if out.finished:
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        errors = [r for r in results.values() if isinstance(r, RequestError)]
        if errors:
            raise EngineOutputError(f"request {errors[0].request_id}: {errors[0].message}")
        return [results[rid] for rid in order]
