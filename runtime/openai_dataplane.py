"""The OpenAI dataplane: OpenAI request semantics over any generative model in the registry.

Routes (``runtime.openai_routes``) hand it parsed requests; it resolves the model in KServe's
``ModelRepository`` (404 unknown, 503 not ready), validates the request, renders and tokenises
the prompt through the model, checks it against the context length, runs the engine and shapes
the outputs into OpenAI responses or streams of chunks. Every failure is an ``OpenAIError``
carrying the HTTP status and an OpenAI-shaped body. No HTTP and no model-specific code here.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from engine.media import MediaError
from engine.output_processor import OutputKind
from engine.outputs import (
    CompletionOutput,
    EngineOutputError,
    PositionLogprobs,
    RequestOutput,
)
from engine.pooling_params import PoolingParams
from engine.sampling_params import SamplingParams
from runtime._kserve import kserve
from runtime.chunk_json import ChatChunkWriter, JSONText
from runtime.model import EnginePrompt, PromptError, VLMModel
from runtime.openai_protocol import (
    AssistantMessage,
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ErrorInfo,
    ErrorResponse,
    ImageContentPart,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
    VideoContentPart,
)


class OpenAIError(Exception):
    """An API error: HTTP ``status`` plus OpenAI's ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _from_value_error(exc: ValueError, what: str | None = None) -> OpenAIError:
    """SamplingParams / engine ValueErrors read "field: problem"; the field becomes ``param``
    (the engine's ``prompt`` is the request's ``what``, e.g. ``messages``, when given)."""
    msg = str(exc)
    if isinstance(exc, PromptError):
        return bad_request(msg, exc.param, exc.code)
    head = msg.split(":", 1)[0].split("[", 1)[0]
    param = head if head.isidentifier() else None
    if param == "prompt" and what is not None:
        param = what
    if "max_model_len" in msg and not isinstance(exc, MediaError):
        # The prompt fits as text but not once image placeholders are expanded (checked by the engine).
        return bad_request(msg, param, "context_length_exceeded")
    if isinstance(exc, MediaError):  # 400 (bad or unreachable image), 413 (too large), ...
        status = exc.status
        return OpenAIError(status, msg, type="invalid_request_error" if status < 500 else "upstream_error",
                           param=param, code="invalid_media")
    return bad_request(msg, param)


async def _first(stream: AsyncIterator[Any], what: str | None = None) -> Any:
    """The stream's first item (None if empty); an engine ValueError (e.g. the prompt is too long
    once image placeholders are expanded) becomes a 400 before anything is sent."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None
    except ValueError as exc:
        raise _from_value_error(exc, what) from exc


def _clamp(logprob: float) -> float:
    return -9999.0 if math.isnan(logprob) or logprob < -9999.0 else logprob  # JSON has no -inf


def _top(entry: PositionLogprobs, k: int) -> list[tuple[int, Any]]:
    return sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k),
                  key=lambda x: x[1].rank)


def chat_logprob_entries(c: CompletionOutput, k: int) -> list[dict[str, Any]] | None:
    """``ChatChoiceLogprobs.content`` as plain dicts (token, logprob, top_logprobs; ``bytes`` is
    the token's UTF-8), for ``ChatChunkWriter``."""
    if c.logprobs is None:
        return None
    content = []
    for token_id, entry in zip(c.token_ids, c.logprobs):
        chosen = entry[token_id]
        tops = [{"token": lp.decoded_token or "", "logprob": _clamp(lp.logprob)} for _, lp in _top(entry, k)]
        content.append({"token": chosen.decoded_token or "", "logprob": _clamp(chosen.logprob), "top_logprobs": tops})
    return content


def chat_logprobs(c: CompletionOutput, k: int) -> ChatChoiceLogprobs | None:
    entries = chat_logprob_entries(c, k)
    if entries is None:
        return None
    return ChatChoiceLogprobs(content=[
        TokenLogprob(token=e["token"], logprob=e["logprob"], bytes=list(e["token"].encode()),
                     top_logprobs=[TopLogprob(token=t["token"], logprob=t["logprob"], bytes=list(t["token"].encode()))
                                   for t in e["top_logprobs"]]) for e in entries])


def completion_logprobs(c: CompletionOutput, k: int, offset: int = 0) -> CompletionLogprobs | None:
    if c.logprobs is None:
        return None
    out = CompletionLogprobs()
    for token_id, entry in zip(c.token_ids, c.logprobs):
        chosen = entry[token_id]
        text = chosen.decoded_token or ""
        out.tokens.append(text)
        out.token_logprobs.append(_clamp(chosen.logprob))
        out.top_logprobs.append({lp.decoded_token or "": _clamp(lp.logprob) for _, lp in _top(entry, k)})
        out.text_offset.append(offset)
        offset += len(text)
    return out


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """``first`` then the rest of the stream; engine ValueErrors become OpenAIErrors."""
    if first is not None:
        yield first
    try:
        async for item in rest:
            yield item
    except ValueError as exc:
        raise _from_value_error(exc) from exc


class _DeltaFilter:
    """Which deltas become chunks: not one with no text (the detokenizer holding back a partial
    character), no logprobs and no finish (its tokens are still counted), and nothing more for a
    choice once its finish was sent (the engine repeats a finished sample of an n > 1 request
    in later deltas)."""

    def __init__(self) -> None:
        self.finished: set[int] = set()

    def skip(self, index: int, c: CompletionOutput) -> bool:
        if index in self.finished:
            return True
        if c.finish_reason is not None:
            self.finished.add(index)
            return False
        return not c.text and not c.logprobs


async def merge_streams(streams: Sequence[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several engine streams as (stream index, output); closing this closes them all
    (which aborts their engine requests)."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with aclosing(stream) as s:
                async for item in s:
                    queue.put_nowait((i, item))
            queue.put_nowait((i, done))
        except Exception as exc:  # noqa: BLE001 (re-raised by the consumer)
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIDataPlane:
    """OpenAI's chat / completions / models semantics over the models of a ModelRepository."""

    def __init__(self, registry: kserve.ModelRepository) -> None:
        self.registry = registry

    # -- models ----------------------------------------------------------------------------------
    def _models(self) -> dict[str, VLMModel]:
        return {name: m for name, m in self.registry.get_models().items() if isinstance(m, VLMModel)}

    def list_models(self) -> ModelList:
        """The served models; 503 while any is not ready, as ``/health`` (vLLM lists models only
        once it serves them: a 200 here promises that chat will not answer 503)."""
        models = self._models()
        for name, model in models.items():
            self._check_ready(name, model)
        return ModelList(data=[self._card(name, m) for name, m in models.items()])

    def model_card(self, model_id: str) -> ModelCard:
        model = self._models().get(model_id)
        if model is None:
            raise self._not_found(model_id)
        self._check_ready(model_id, model)
        return self._card(model_id, model)

    @staticmethod
    def _check_ready(name: str, model: VLMModel) -> None:
        if not model.ready or model.llm is None:
            raise OpenAIError(503, f"The model `{name}` is not ready yet (loading or shutting down).",
                              type="service_unavailable_error", code="model_not_ready")

    @staticmethod
    def _card(name: str, model: VLMModel) -> ModelCard:
        # root: the served name, never the local model path (vLLM gives the model id it was given).
        return ModelCard(id=name, root=model.name,
                         max_model_len=model.max_model_len if model.llm is not None else None)

    @staticmethod
    def _not_found(name: str) -> OpenAIError:
        return OpenAIError(404, f"The model `{name}` does not exist.", type="not_found_error", param="model",
                           code="model_not_found")

    def resolve(self, name: str | None) -> tuple[str, VLMModel]:
        models = self._models()
        if name is None:
            distinct = {id(m) for m in models.values()}
            if len(distinct) != 1:
                raise bad_request("model: is required when the server serves several models", "model")
            name = next(iter(models))
        model = models.get(name)
        if model is None:
            raise self._not_found(name)
        self._check_ready(name, model)
        return name, model

    # -- shared checks ---------------------------------------------------------------------------
    @staticmethod
    def _check_task(model: VLMModel, name: str, embedding: bool) -> None:
        """An embedding model serves only /v1/embeddings; a generative one everything else."""
        if embedding and not model.is_embedding:
            raise bad_request(f"The model `{name}` does not support embeddings: it is served with --task generate "
                              "(start the server with --task embedding to serve /v1/embeddings)", "model",
                              "model_not_supported")
        if not embedding and model.is_embedding:
            raise bad_request(f"The model `{name}` is an embedding model (--task embedding): it does not support "
                              "chat or text completions; use /v1/embeddings", "model", "model_not_supported")

    @staticmethod
    def _sampling_params(req: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
        problem = req.unsupported()
        if problem is not None:
            raise bad_request(problem[1], problem[0], "unsupported_parameter")
        try:
            return req.to_sampling_params()
        except ValueError as exc:
            raise _from_value_error(exc) from exc

    @staticmethod
    def _check_length(model: VLMModel, prompt: EnginePrompt, max_tokens: int | None, what: str) -> None:
        try:
            model.check_prompt_length(prompt, max_tokens, what)
        except PromptError as exc:
            raise _from_value_error(exc) from exc

    @staticmethod
    def _check_images(model: VLMModel, req: ChatCompletionRequest | EmbeddingRequest) -> None:
        """Refuse more images or videos than the model takes per prompt before any is downloaded
        or decoded."""
        parts = [p for m in req.messages or () if isinstance(m.content, list) for p in m.content]
        try:
            model.check_image_count(sum(isinstance(p, ImageContentPart) for p in parts), "messages")
            model.check_video_count(sum(isinstance(p, VideoContentPart) for p in parts), "messages")
        except PromptError as exc:
            raise _from_value_error(exc) from exc

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)

    @staticmethod
    async def _finals(model: VLMModel, prompts: list[EnginePrompt], params: SamplingParams,
                      rid: str, what: str) -> list[RequestOutput]:
        streams = [model.generate(p, params, f"{rid}-{i}", OutputKind.FINAL_ONLY) for i, p in enumerate(prompts)]
        finals: list[Any] = [None] * len(prompts)
        try:
            async with aclosing(merge_streams(streams)) as merged:
                async for i, out in merged:
                    finals[i] = out
        except ValueError as exc:
            raise _from_value_error(exc, what) from exc
        return finals

    # -- chat ------------------------------------------------------------------------------------
    async def create_chat_completion(
        self, req: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[ChatCompletionChunk]:
        name, model = self.resolve(req.model)
        self._check_task(model, name, embedding=False)
        params = self._sampling_params(req)
        messages = []
        for m in req.messages:
            msg = m.model_dump()
            if msg.get("name") is None:
                msg.pop("name", None)
            messages.append(msg)
        self._check_images(model, req)
        try:
            prompt = await model.render_chat(messages, req.add_generation_prompt)
        except ValueError as exc:
            raise _from_value_error(exc) from exc
        self._check_length(model, prompt, req.requested_max_tokens, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        k = req.top_logprobs or 0
        if req.stream:
            return self._chat_stream(model, name, prompt, params, rid, k, req.include_usage)
        (final,) = await self._finals(model, [prompt], params, rid, "messages")
        choices = [ChatCompletionChoice(index=c.index, message=AssistantMessage(content=c.text),
                                        logprobs=chat_logprobs(c, k), finish_reason=c.finish_reason,
                                        stop_reason=c.stop_reason) for c in final.outputs]
        return ChatCompletionResponse(id=rid, model=name, choices=choices, usage=self._usage(
            len(final.prompt_token_ids), sum(len(c.token_ids) for c in final.outputs)))

    async def _chat_stream(self, model: VLMModel, name: str, prompt: EnginePrompt, params: SamplingParams,
                           rid: str, k: int, include_usage: bool) -> AsyncIterator[ChatCompletionChunk]:
        created = int(time.time())
        writer = ChatChunkWriter(rid, created, name)  # the chunks' JSON, without a model per token

        def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=name, choices=choices, usage=usage)

        completion_tokens = 0
        deltas = _DeltaFilter()
        stream = model.generate(prompt, params, rid, OutputKind.DELTA)
        async with aclosing(stream):
            # The engine accepted the request (its first output is there) before anything is sent.
            first = await _first(stream, "messages")
            # The engine's prompt length: image placeholders expanded.
            prompt_tokens = len(first.prompt_token_ids) if first is not None else len(prompt.token_ids)
            for i in range(params.n):
                yield JSONText(writer.role(i))
            async for out in _chain(first, stream):
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    if deltas.skip(c.index, c):
                        continue
                    entries = chat_logprob_entries(c, k)
                    text = writer.content(c.index, c.text, entries, c.finish_reason, c.stop_reason)
                    if text is not None:
                        yield JSONText(text)
                        continue
                    yield chunk([ChatCompletionStreamChoice(  # a non-finite logprob: the models write it
                        index=c.index, delta=DeltaMessage(content=c.text), logprobs=chat_logprobs(c, k),
                        finish_reason=c.finish_reason, stop_reason=c.stop_reason)])
        if include_usage:
            yield JSONText(writer.usage(prompt_tokens, completion_tokens))

    # -- completions -----------------------------------------------------------------------------
    async def create_completion(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator[CompletionChunk]:
        name, model = self.resolve(req.model)
        self._check_task(model, name, embedding=False)
        params = self._sampling_params(req)
        prompts = []
        try:
            for p in req.prompts():
                prompts.append(await model.encode_text(p) if isinstance(p, str) else model.encode_token_ids(p))
        except ValueError as exc:
            raise _from_value_error(exc) from exc
        for p in prompts:
            self._check_length(model, p, req.max_tokens, "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        k = req.logprobs or 0
        if req.stream:
            return self._completion_stream(model, name, prompts, params, rid, k, req.include_usage)
        finals = await self._finals(model, prompts, params, rid, "prompt")
        choices = [CompletionChoice(index=i * params.n + c.index, text=c.text, logprobs=completion_logprobs(c, k),
                                    finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                   for i, final in enumerate(finals) for c in final.outputs]
        usage = self._usage(sum(len(f.prompt_token_ids) for f in finals),
                            sum(len(c.token_ids) for f in finals for c in f.outputs))
        return CompletionResponse(id=rid, model=name, choices=choices, usage=usage)

    async def _completion_stream(self, model: VLMModel, name: str, prompts: list[EnginePrompt],
                                 params: SamplingParams, rid: str, k: int,
                                 include_usage: bool) -> AsyncIterator[CompletionChunk]:
        created = int(time.time())
        offsets: dict[int, int] = {}
        completion_tokens = 0
        prompt_tokens = {i: len(p.token_ids) for i, p in enumerate(prompts)}
        deltas = _DeltaFilter()
        streams = [model.generate(p, params, f"{rid}-{i}", OutputKind.DELTA) for i, p in enumerate(prompts)]
        async with aclosing(merge_streams(streams)) as merged:
            first = await _first(merged)
            async for i, out in _chain(first, merged):
                prompt_tokens[i] = len(out.prompt_token_ids)
                for c in out.outputs:
                    index = i * params.n + c.index
                    completion_tokens += len(c.token_ids)
                    if deltas.skip(index, c):
                        continue
                    lps = completion_logprobs(c, k, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(c.text)
                    yield CompletionChunk(id=rid, created=created, model=name, choices=[CompletionChoice(
                        index=index, text=c.text, logprobs=lps, finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason)])
        if include_usage:
            yield CompletionChunk(id=rid, created=created, model=name, choices=[],
                                  usage=self._usage(sum(prompt_tokens.values()), completion_tokens))

    # -- embeddings ------------------------------------------------------------------------------
    async def create_embedding(self, req: EmbeddingRequest) -> EmbeddingResponse:
        """OpenAI's embeddings (``input``: texts or token-id lists) or vLLM's chat form
        (``messages``, the chat template applied, images allowed)."""
        name, model = self.resolve(req.model)
        self._check_task(model, name, embedding=True)
        problem = req.problem()
        if problem is not None:
            raise bad_request(problem[1], problem[0])
        size = model.embedding_size
        if req.dimensions is not None and req.dimensions > size:
            raise bad_request(f"dimensions: {req.dimensions} is more than the model's embedding size ({size})",
                              "dimensions")
        params = PoolingParams(normalize=True if req.normalize is None else req.normalize, dimensions=req.dimensions)
        prompts: list[EnginePrompt] = []
        what = "messages" if req.messages is not None else "input"
        try:
            if req.messages is not None:
                self._check_images(model, req)
                messages = []
                for m in req.messages:
                    msg = m.model_dump()
                    if msg.get("name") is None:
                        msg.pop("name", None)
                    messages.append(msg)
                prompts.append(await model.render_chat(messages, req.add_generation_prompt))
            else:
                special = True if req.add_special_tokens is None else req.add_special_tokens
                for p in req.inputs():
                    prompts.append(await model.encode_text(p, special) if isinstance(p, str)
                                   else model.encode_token_ids(p))
        except ValueError as exc:
            raise _from_value_error(exc, what) from exc
        limit = model.max_model_len
        for p in prompts:
            n = len(p.token_ids)
            if n == 0:
                raise bad_request(f"{what}: the input is empty after tokenisation", what)
            if n > limit:
                raise bad_request(f"{what}: the input is {n} tokens long, but this model's maximum context length "
                                  f"(max_model_len) is {limit} tokens; shorten the input", what,
                                  "context_length_exceeded")
        rid = f"embd-{uuid.uuid4().hex}"
        streams = [model.encode(p, params, f"{rid}-{i}") for i, p in enumerate(prompts)]
        finals: list[Any] = [None] * len(prompts)
        try:
            async with aclosing(merge_streams(streams)) as merged:
                async for i, out in merged:
                    finals[i] = out
        except EngineOutputError as exc:
            raise OpenAIError(500, str(exc), type="internal_server_error", code="invalid_output") from exc
        except ValueError as exc:
            raise _from_value_error(exc, what) from exc
        data = []
        for i, out in enumerate(finals):
            values = out.outputs.embedding
            if not all(math.isfinite(x) for x in values):  # never write NaN / inf into JSON
                raise OpenAIError(500, "the model produced a non-finite embedding (NaN or inf)",
                                  type="internal_server_error", code="invalid_output")
            if req.encoding_format == "base64":
                import numpy as np

                emb: list[float] | str = base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")
            else:
                emb = values
            data.append(EmbeddingData(index=i, embedding=emb))
        tokens = sum(len(out.prompt_token_ids) for out in finals)
        return EmbeddingResponse(id=rid, model=name, data=data,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
