"""Streamed chunk JSON without a pydantic model per token.

Building ``ChatCompletionChunk`` / ``CompletionChunk`` models and calling ``model_dump_json`` cost
~7.5 µs per chunk on this machine (the ``delta`` field serializer alone calls ``model_dump``
again); the API process writes one chunk per output token of every stream, so that was a sixth
of its CPU per token. These functions write the same bytes from a template: the parts that do
not change within a stream (id, created, model) are encoded once per stream.

The output must equal pydantic's ``model_dump_json()`` byte for byte (tests/test_chunk_json.py
checks it against pydantic as the oracle), so the two details where Python's ``json`` differs
from pydantic's serializer are handled here:

- strings: pydantic writes non-ASCII characters as UTF-8 (``ensure_ascii=False``) and refuses
  lone surrogates (a ``PydanticSerializationError``); ``_string`` raises ``UnicodeEncodeError``
  for them, so the stream ends with the same internal-error event.
- floats: pydantic writes ``1e-7`` and ``0.00002`` where ``repr`` writes ``1e-07`` and ``2e-05``;
  ``_float`` converts. Non-finite floats (only
  a ``+inf`` logprob could reach here) fall back to the models.
"""

from __future__ import annotations

import json
import math
from typing import Any

_encode_str = json.JSONEncoder(ensure_ascii=False).encode


class JSONText(str):
    """A chunk already written as JSON; it answers ``model_dump_json`` as the models do, so
    that the SSE writer takes either."""

    __slots__ = ()

    def model_dump_json(self) -> str:
        return str.__str__(self)


def _string(text: str) -> str:
    if not text.isascii():
        text.encode()  # lone surrogates: raise as pydantic does instead of writing invalid UTF-8
    return _encode_str(text)


def _opt_string(text: str | None) -> str:
    return "null" if text is None else _string(text)


def _float(value: float) -> str:
    """``value`` (finite) as pydantic writes it."""
    r = repr(float(value))
    if "e" not in r:
        return r
    mantissa, exp = r.split("e")
    e = int(exp)
    if e >= 0:
        return r  # 1e+16: the same in both
    if e == -5:  # pydantic writes 1e-5 <= |x| < 1e-4 in decimal; repr switches at 1e-4
        sign = "-" if mantissa.startswith("-") else ""
        return f"{sign}0.0000{mantissa.lstrip('-').replace('.', '')}"
    return f"{mantissa}e{e}"  # 1e-07 -> 1e-7


def _stop_reason(value: int | str | None) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return _string(value)
    return str(int(value))


def _bytes(text: str) -> str:
    return "[" + ",".join(map(str, text.encode())) + "]"


class ChatChunkWriter:
    """The ``data: ...`` JSON of one chat stream's chunks, as ``ChatCompletionChunk.model_dump_json``."""

    def __init__(self, rid: str, created: int, model: str) -> None:
        self._head = (f'{{"id":{_string(rid)},"object":"chat.completion.chunk","created":{int(created)},'
                      f'"model":{_string(model)},"choices":[')

    def content(self, index: int, text: str, logprobs: list[dict[str, Any]] | None,
                finish_reason: str | None, stop_reason: int | str | None) -> str | None:
        """One choice's delta ``{"content": text}``; ``logprobs``: the entries of
        ``ChatChoiceLogprobs.content`` as dicts (token, logprob, bytes, top_logprobs), or None.
        None when a logprob is not finite (the caller then builds the models)."""
        lp = "null"
        if logprobs is not None:
            lp = _chat_logprobs(logprobs)
            if lp is None:
                return None
        return (f'{self._head}{{"index":{int(index)},"delta":{{"content":{_string(text)}}},"logprobs":{lp},'
                f'"finish_reason":{_opt_string(finish_reason)},"stop_reason":{_stop_reason(stop_reason)}}}],'
                f'"usage":null}}')

    def role(self, index: int) -> str:
        return (f'{self._head}{{"index":{int(index)},"delta":{{"role":"assistant","content":""}},"logprobs":null,'
                f'"finish_reason":null,"stop_reason":null}}],"usage":null}}')

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        return (f'{self._head}],"usage":{{"prompt_tokens":{int(prompt_tokens)},'
                f'"completion_tokens":{int(completion_tokens)},'
                f'"total_tokens":{int(prompt_tokens) + int(completion_tokens)}}}}}')


def _chat_logprobs(content: list[dict[str, Any]]) -> str | None:
    parts = []
    for entry in content:
        tops = []
        for top in entry["top_logprobs"]:
            if not math.isfinite(top["logprob"]):
                return None
            tops.append(f'{{"token":{_string(top["token"])},"logprob":{_float(top["logprob"])},'
                        f'"bytes":{_bytes(top["token"])}}}')
        if not math.isfinite(entry["logprob"]):
            return None
        parts.append(f'{{"token":{_string(entry["token"])},"logprob":{_float(entry["logprob"])},'
                     f'"bytes":{_bytes(entry["token"])},"top_logprobs":[{",".join(tops)}]}}')
    return f'{{"content":[{",".join(parts)}]}}'
