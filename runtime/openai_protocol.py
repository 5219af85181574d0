"""OpenAI-compatible request and response models (pydantic), independent of vLLM's.

Requests accept OpenAI's fields plus vLLM's common extensions (top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids, ...); unknown fields are ignored, as vLLM does. Fields
that we parse but cannot honour yet are rejected with a 400 by ``unsupported()``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

from engine.sampling_params import SamplingParams


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


class StrictModel(OpenAIBaseModel):
    """Fields of the exact JSON type: ``"10"`` or ``true`` for an integer, ``"yes"`` for a
    boolean and non-finite numbers are 400s naming the field, not coerced (an int is a float)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(StrictModel):
    include_usage: bool = False


class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ImageURL(OpenAIBaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageContentPart(OpenAIBaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(OpenAIBaseModel):
    url: str


class VideoContentPart(OpenAIBaseModel):
    """vLLM's ``{"type": "video_url", "video_url": {"url": ...}}`` (decoded by engine.video_decode)."""

    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextContentPart | ImageContentPart | VideoContentPart, Field(discriminator="type")]


class ChatMessage(OpenAIBaseModel):
    """One message; extra keys (tool_calls, tool_call_id, ...) are kept for the chat template."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_parts(cls, content: Any) -> Any:
        """Plain messages for the common mistakes (instead of one error per union branch)."""
        if not isinstance(content, list):
            return content
        for i, part in enumerate(content):
            if not isinstance(part, dict):
                raise ValueError(f"content[{i}]: must be an object such as {{\"type\": \"text\", \"text\": ...}}")
            kind = part.get("type")
            if kind not in ("text", "image_url", "video_url"):
                raise ValueError(f"content[{i}].type: unsupported content part type {kind!r}; "
                                 "use 'text', 'image_url' or 'video_url'")
            if kind in ("image_url", "video_url"):
                ref = part.get(kind)
                if isinstance(ref, str):
                    raise ValueError(f"content[{i}].{kind}: must be an object {{\"url\": \"...\"}}, "
                                     "not a bare string")
                if not isinstance(ref, dict) or not isinstance(ref.get("url"), str):
                    raise ValueError(f"content[{i}].{kind}: must be an object with a string 'url'")
        return content


class _SamplingRequest(StrictModel):
    """Fields common to chat and text completions, and their mapping onto SamplingParams (whose
    validation, shared with every route, bounds the values)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a request we cannot honour, else None."""
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        return None

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises ValueError naming the offending field (from SamplingParams' validation)."""
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    # vLLM extension
    add_generation_prompt: bool = True

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tools / function calling is not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", "only response_format {\"type\": \"text\"} is supported"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs requires logprobs to be true"
        return super().unsupported()

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(self.requested_max_tokens, logprobs)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of is not supported (it must equal n)"
        if isinstance(self.prompt, list) and not self.prompt:
            return "prompt", "prompt must not be an empty list"
        return super().unsupported()

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list of texts or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt given as token ids
        return list(p)

    def to_sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)


class EmbeddingRequest(OpenAIBaseModel):
    """OpenAI's embeddings request, plus vLLM's chat form: ``messages`` instead of ``input`` (the
    chat template is applied; images allowed as in chat)."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] | None = None
    messages: list[ChatMessage] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # vLLM extensions
    normalize: bool | None = None
    add_generation_prompt: bool = False  # chat form: vLLM's default for embeddings
    add_special_tokens: bool | None = None  # default: True for input, False for messages

    def problem(self) -> tuple[str, str] | None:
        """(param, message) when the request is malformed, else None."""
        if (self.input is None) == (self.messages is None):
            return ("input", "give exactly one of 'input' or 'messages'")
        if self.messages is not None and not self.messages:
            return ("messages", "must not be empty")
        if isinstance(self.input, list) and not self.input:
            return ("input", "must not be an empty list")
        if isinstance(self.input, list) and any(isinstance(x, list) and not x for x in self.input):
            return ("input", "token-id lists must not be empty")
        if self.dimensions is not None and self.dimensions <= 0:
            return ("dimensions", f"must be a positive integer, got {self.dimensions}")
        return None

    def inputs(self) -> list[str | list[int]]:
        """``input`` as a list of texts or token-id lists."""
        p = self.input
        if isinstance(p, str):
            return [p]
        assert p is not None
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one input given as token ids
        return list(p)


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(OpenAIBaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(OpenAIBaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM extension: the stop string or token that ended it


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(OpenAIBaseModel):
    role: str | None = None
    content: str | None = None


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @field_serializer("delta")
    def _delta(self, delta: DeltaMessage) -> dict[str, Any]:
        return delta.model_dump(exclude_none=True)  # OpenAI sends {"content": "..."}, not nulls


class ChatCompletionChunk(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# A streamed completion chunk has the same shape as the full response.
CompletionChunk = CompletionResponse


class EmbeddingData(OpenAIBaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32 bytes


class EmbeddingUsage(OpenAIBaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0


class EmbeddingResponse(OpenAIBaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "vlmserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo
