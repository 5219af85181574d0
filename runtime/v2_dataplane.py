"""The v2 (Open Inference Protocol) dataplane for generative models, after Triton's vLLM backend.

Transport-independent: the REST routes (``runtime.v2_routes``) and the gRPC servicer
(``runtime.v2_grpc``) decode their wire format into a ``DecodedRequest`` (``runtime.v2_codec``),
and this module validates the tensors, runs the engine and produces output tensors.

Inputs (names and types as the Triton vLLM backend, declared in ``VLMModel.get_input_types``):

* ``text_input`` BYTES, one element (required): the prompt;
* ``image`` BYTES, any number of elements: encoded images, raw or base64 (optionally a
  ``data:image/...;base64,`` URL); the model's image placeholder goes in front of a text that
  has none;
* ``sampling_parameters`` BYTES, one element: a JSON object (temperature, top_p, top_k, min_p,
  max_tokens, min_tokens, stop, stop_token_ids, seed, presence/frequency/repetition_penalty,
  ignore_eos, skip_special_tokens, include_stop_str_in_output); numbers may be given as strings;
* ``stream`` BOOL (only where streaming is possible), ``exclude_input_in_output`` BOOL: as in
  Triton's vLLM backend, a non-streamed ``text_output`` is the prompt followed by the generated
  text unless this is true; streamed pieces never repeat the prompt;
* the vLLM backend's ``return_*`` BOOL flags are accepted and ignored (every output is
  available; the request's ``outputs`` list selects).

An embedding model (``--task embedding``) takes ``text_input`` BYTES [N] only and answers
``embedding`` FP32 [N, dims] (``V2DataPlane.embed``).

Outputs: ``text_output`` BYTES, ``finish_reason`` BYTES, ``num_input_tokens`` INT32,
``num_output_tokens`` INT32 (each shape [1]). A streamed response carries ``text_output`` and
``num_output_tokens`` of its piece; the last one also ``finish_reason`` and ``num_input_tokens``.
"""

from __future__ import annotations

import base64
import binascii
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from engine.output_processor import OutputKind
from engine.outputs import EngineOutputError
from engine.pooling_params import PoolingParams
from engine.sampling_params import SamplingParams
from runtime._kserve import kserve
from runtime.json_body import JSONBodyError, parse_json
from runtime.model import EnginePrompt, PromptError, VLMModel
from runtime.v2_codec import DecodedRequest, Tensor, V2Error

# Why the model repository extension (load / unload / index) is not served, for REST and gRPC.
NO_REPOSITORY = ("vlmserve serves one model loaded at start-up: the model repository extension "
                 "(load, unload, index) is not served")
MODEL_VERSION = "1"  # the one version each model has (what responses and metadata name)
OUTPUT_NAMES = ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens")
EMBEDDING_OUTPUT_NAMES = ("embedding",)
_IGNORED_INPUTS = frozenset({"return_finish_reason", "return_cumulative_logprob", "return_logprobs",
                             "return_num_input_tokens", "return_num_output_tokens"})
_SAMPLING_TYPES: dict[str, type] = {
    "temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int, "max_tokens": int,
    "min_tokens": int, "presence_penalty": float, "frequency_penalty": float, "repetition_penalty": float,
    "ignore_eos": bool, "skip_special_tokens": bool, "include_stop_str_in_output": bool,
    "stop": list, "stop_token_ids": list,
}
# Request-level parameters that are protocol settings, not sampling parameters.
_PROTOCOL_PARAMETERS = frozenset({"binary_data_output", "stream", "exclude_input_in_output", "sequence_id",
                                  "sequence_start", "sequence_end", "priority", "timeout",
                                  "triton_enable_empty_final_response", "headers"})


@dataclass
class GenerateRequest:
    """A validated v2 generation request."""

    text: str
    images: list[bytes] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    exclude_input: bool = False
    id: str = ""


@dataclass
class Piece:
    """One response's worth of generation: the whole result, or one streamed piece."""

    text: str
    num_output_tokens: int
    finish_reason: str | None = None
    num_input_tokens: int | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


# -- inputs ---------------------------------------------------------------------------------------------
def _one(t: Tensor, datatype: str) -> Any:
    if t.datatype != datatype:
        raise V2Error(f"input '{t.name}': expected datatype {datatype}, got {t.datatype}")
    if len(t.data) != 1:
        raise V2Error(f"input '{t.name}': expected exactly one element, got {len(t.data)}")
    return t.data[0]


def _utf8(name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise V2Error(f"input '{name}': not valid UTF-8 ({exc})") from exc


def image_bytes(value: bytes, index: int) -> bytes:
    """An ``image`` element: raw encoded bytes, or base64 text (optionally a data URL) of them."""
    s = value.strip()
    is_url = s[:5].lower() == b"data:"
    if is_url:
        header, sep, payload = s.partition(b",")
        if not sep or b";base64" not in header:
            raise V2Error(f"input 'image'[{index}]: a data URL must look like data:image/png;base64,...")
        s = payload
    try:
        return base64.b64decode(b"".join(s.split()), validate=True)
    except (binascii.Error, ValueError):
        if is_url:
            raise V2Error(f"input 'image'[{index}]: invalid base64 data") from None
        return value  # raw encoded bytes (PNG, JPEG, ... are never valid base64)


def _coerce(key: str, value: Any) -> Any:
    kind = _SAMPLING_TYPES[key]
    if key == "seed" and value is None:
        return None
    if kind is list:  # stop: str or list of str; stop_token_ids: list of int
        if key == "stop":
            if isinstance(value, str):
                value = parse_json(value, f"'{key}'") if value.startswith("[") else value
            if isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value)):
                return value
            raise ValueError("must be a string or a list of strings")
        if isinstance(value, str):
            value = parse_json(value, f"'{key}'")
        if isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return value
        raise ValueError("must be a list of integers")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError("must be true or false")
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"must be {what}, got {value!r}")
    if kind is int and isinstance(value, int):
        return value  # exact: a seed past 2**53 must not round through float (SamplingParams bounds it)
    try:
        out = float(value)
    except ValueError:
        raise ValueError(f"must be {what}, got {value!r}") from None
    if kind is int:
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        if not out.is_integer():
            raise ValueError(f"must be {what}, got {value!r}")
        return int(out)
    if not math.isfinite(out):
        raise ValueError("must be finite")
    return out


def sampling_params(values: dict[str, Any], where: str) -> SamplingParams:
    """Engine ``SamplingParams`` from a JSON object; unknown keys and bad values -> V2Error."""
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in _SAMPLING_TYPES:
            if key == "n" and value in (1, "1"):
                continue
            raise V2Error(f"{where}: unsupported sampling parameter '{key}' (supported: "
                          f"{', '.join(sorted(_SAMPLING_TYPES))})")
        try:
            kwargs[key] = _coerce(key, value)
        except (ValueError, TypeError) as exc:  # JSONBodyError included
            raise V2Error(f"{where}: '{key}' {exc}") from exc
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise V2Error(f"{where}: {exc}") from exc


def parse_request(req: DecodedRequest, *, allow_stream: bool) -> GenerateRequest:
    """Validate the tensors of an infer request (transport-independent)."""
    by_name: dict[str, Tensor] = {}
    for t in req.inputs:
        if t.name in by_name:
            raise V2Error(f"input '{t.name}': given more than once")
        by_name[t.name] = t
    known = {"text_input", "image", "sampling_parameters", "stream", "exclude_input_in_output"} | _IGNORED_INPUTS
    unknown = sorted(set(by_name) - known)
    if unknown:
        raise V2Error(f"unexpected input '{unknown[0]}' (the model takes text_input, image, "
                      "sampling_parameters, stream, exclude_input_in_output)")
    if "text_input" not in by_name:
        raise V2Error("input 'text_input' is required (BYTES, shape [1])")
    out = GenerateRequest(text=_utf8("text_input", _one(by_name["text_input"], "BYTES")), id=req.id)
    if "image" in by_name:
        t = by_name["image"]
        if t.datatype != "BYTES":
            raise V2Error(f"input 'image': expected datatype BYTES, got {t.datatype}")
        out.images = [image_bytes(v, i) for i, v in enumerate(t.data)]
    for flag, attr in (("stream", "stream"), ("exclude_input_in_output", "exclude_input")):
        if flag in by_name:
            setattr(out, attr, bool(_one(by_name[flag], "BOOL")))
        elif isinstance(req.parameters.get(flag), bool):
            setattr(out, attr, req.parameters[flag])
    for name in _IGNORED_INPUTS & set(by_name):
        _one(by_name[name], "BOOL")
    # Sampling parameters: request-level parameters (Triton's generate "parameters"), then the
    # sampling_parameters input, which wins.
    values = {k: v for k, v in req.parameters.items() if k not in _PROTOCOL_PARAMETERS}
    if "sampling_parameters" in by_name:
        raw = _utf8("sampling_parameters", _one(by_name["sampling_parameters"], "BYTES"))
        try:
            parsed = parse_json(raw, "input 'sampling_parameters'") if raw.strip() else {}
        except JSONBodyError as exc:
            raise V2Error(str(exc)) from exc
        if not isinstance(parsed, dict):
            raise V2Error("input 'sampling_parameters': must be a JSON object")
        values.update(parsed)
    out.params = sampling_params(values, "input 'sampling_parameters'")
    if out.stream and not allow_stream:
        raise V2Error("input 'stream': must be false here; stream with generate_stream or gRPC ModelStreamInfer")
    return out


# -- the dataplane ------------------------------------------------------------------------------------
class V2DataPlane:
    """Generation over the models of KServe's ModelRepository, in v2 tensors."""

    def __init__(self, registry: kserve.ModelRepository) -> None:
        self.registry = registry

    def resolve(self, name: str, version: str | None = None) -> VLMModel:
        """The served model ``name``; ``version`` (as the URL or gRPC request gives it) must be
        empty or the one version served (404 otherwise, as for an unknown model)."""
        model = self.registry.get_model(name)
        if model is None:
            raise V2Error(f"Model with name {name} does not exist.", 404)
        if version not in (None, "", MODEL_VERSION):
            raise V2Error(f"Model {name} has no version {version!r}; it serves version {MODEL_VERSION} only.", 404)
        if not isinstance(model, VLMModel):
            raise V2Error(f"model {name} is not a generative model", 400)
        if not model.ready or model.llm is None:
            raise V2Error(f"Model with name {name} is not ready.", 503)
        return model

    @staticmethod
    def check_outputs(req: DecodedRequest, model: VLMModel | None = None) -> None:
        names = EMBEDDING_OUTPUT_NAMES if model is not None and model.is_embedding else OUTPUT_NAMES
        for o in req.outputs or ():
            if o.name not in names:
                raise V2Error(f"unexpected output '{o.name}' (the model gives {', '.join(names)})")

    async def embed(self, model: VLMModel, req: DecodedRequest) -> list[Tensor]:
        """An embedding model's infer: ``text_input`` BYTES [N] -> ``embedding`` FP32 [N, dims]
        (L2-normalised, as /v1/embeddings by default)."""
        self.check_outputs(req, model)
        names = [t.name for t in req.inputs]
        if names != ["text_input"]:
            extra = sorted(set(names) - {"text_input"})
            raise V2Error(f"unexpected input '{extra[0]}' (an embedding model takes text_input only)" if extra
                          else "input 'text_input' is required (BYTES, shape [-1]), once")
        t = req.inputs[0]
        if t.datatype != "BYTES":
            raise V2Error(f"input 'text_input': expected datatype BYTES, got {t.datatype}")
        if not t.data:
            raise V2Error("input 'text_input': needs at least one element")
        prompts = []
        for value in t.data:
            prompt = await model.encode_text(_utf8("text_input", value))
            n, limit = len(prompt.token_ids), model.max_model_len
            if n == 0 or n > limit:
                raise V2Error(f"input 'text_input': the prompt is {n} tokens long; it must be 1..{limit} "
                              "(max_model_len)")
            prompts.append(prompt)
        rid = f"v2-embd-{uuid.uuid4().hex}"
        rows: list[list[float]] = []
        try:
            for i, prompt in enumerate(prompts):
                async with aclosing(model.encode(prompt, PoolingParams(), f"{rid}-{i}")) as outs:
                    async for out in outs:
                        rows.append(out.outputs.embedding)
        except EngineOutputError as exc:
            raise V2Error(str(exc), 500) from exc
        except ValueError as exc:
            raise V2Error(str(exc)) from exc
        if len(rows) != len(prompts) or not all(math.isfinite(x) for r in rows for x in r):
            raise V2Error("the engine returned no (or a non-finite) embedding", 500)
        dims = len(rows[0])
        return [Tensor("embedding", "FP32", [len(rows), dims], [x for r in rows for x in r])]

    @staticmethod
    async def prompt(model: VLMModel, req: GenerateRequest) -> EnginePrompt:
        try:
            prompt = await model.encode_text_with_images(req.text, req.images)
            model.check_prompt_length(prompt, req.params.max_tokens, "text_input")
        except PromptError as exc:
            raise V2Error(str(exc)) from exc
        except ValueError as exc:  # engine.media.MediaError: 400, 413, ...
            raise V2Error(str(exc), getattr(exc, "status", 400)) from exc
        return prompt

    async def generate(self, model: VLMModel, req: GenerateRequest) -> AsyncIterator[Piece]:
        """Pieces of the generation: one (the whole text) unless ``req.stream``; the last piece
        has ``finish_reason``. Engine errors found when the request is taken raise V2Error before
        anything is yielded; closing the iterator aborts the engine request."""
        if model.is_embedding:
            raise V2Error(f"model {model.name} is an embedding model (--task embedding): use infer with "
                          "text_input to get its 'embedding' output")
        prompt = await self.prompt(model, req)
        rid = f"v2-{uuid.uuid4().hex}"
        kind = OutputKind.DELTA if req.stream else OutputKind.FINAL_ONLY
        held = 0  # tokens of pieces held back (no text yet), counted in the next piece
        async with aclosing(model.generate(prompt, req.params, rid, kind)) as stream:
            try:
                async for out in stream:
                    c = out.outputs[0]
                    if req.stream:
                        if not c.text and c.finish_reason is None:
                            held += len(c.token_ids)  # the detokenizer holds back a partial character
                            continue
                        yield Piece(c.text, held + len(c.token_ids), c.finish_reason,
                                    len(out.prompt_token_ids) if c.finish_reason is not None else None)
                        held = 0
                    elif out.finished:
                        text = c.text if req.exclude_input else req.text + c.text
                        yield Piece(text, len(c.token_ids), c.finish_reason or "stop", len(out.prompt_token_ids))
            except ValueError as exc:  # the engine refused the prompt (e.g. too long with images)
                raise V2Error(str(exc)) from exc

    async def infer(self, model: VLMModel, req: GenerateRequest) -> Piece:
        async with aclosing(self.generate(model, req)) as pieces:
            async for piece in pieces:
                return piece
        raise V2Error("the engine returned no output", 500)


def output_tensors(piece: Piece, requested: list[str] | None) -> list[Tensor]:
    """The output tensors of one piece, in the order asked (all of them by default)."""
    values: dict[str, Tensor] = {"text_output": Tensor("text_output", "BYTES", [1], [piece.text.encode()])}
    if piece.finish_reason is not None:
        values["finish_reason"] = Tensor("finish_reason", "BYTES", [1], [piece.finish_reason.encode()])
    if piece.num_input_tokens is not None:
        values["num_input_tokens"] = Tensor("num_input_tokens", "INT32", [1], [piece.num_input_tokens])
    values["num_output_tokens"] = Tensor("num_output_tokens", "INT32", [1], [piece.num_output_tokens])
    names = requested if requested is not None else list(OUTPUT_NAMES)
    return [values[n] for n in names if n in values]
