"""REST routes of the Open Inference Protocol for generative models (transport layer).

``register_v2_routes(app, dataplane)`` mounts, ahead of KServe's own v2 routes:

* ``POST /v2/models/{m}[/versions/{v}]/infer``: v2 tensors in JSON or Triton's binary
  extension (``Inference-Header-Content-Length``), answered the same way;
* ``POST /v2/models/{m}[/versions/{v}]/generate``: Triton's generate extension, a JSON object
  whose keys are the inputs (``text_input``, ``image``, ``sampling_parameters`` as a JSON
  string or object, ``stream``, ``exclude_input_in_output``) plus ``parameters`` (sampling
  parameters, e.g. ``{"temperature": 0, "max_tokens": 32}``) -> ``{"model_name",
  "model_version", "text_output", "finish_reason", "num_input_tokens", "num_output_tokens"}``;
* ``POST /v2/models/{m}[/versions/{v}]/generate_stream``: the same as server-sent events
  ``data: {...}``, one per new piece of text (``stream`` defaults to true here); an error after
  the stream started is sent as ``data: {"error": "..."}``.

``register_repository_refusal(app)`` answers everything under ``/v2/repository/`` (KServe's
model repository extension: load, unload, Triton's index) with 405 and ``{"error": "vlmserve
serves one model loaded at start-up: ..."}``, ahead of KServe's load / unload routes: vlmserve
serves the model it started with, and KServe's unload would stop that model for good.

Errors are KServe's v2 shape ``{"error": "..."}`` with 400 (bad input), 404 (unknown model, or
a version other than "1"), 503 (not ready, or the shutdown grace period ended), 413 (image or body
too large). A client that disconnects cancels its request. ``register_version_routes`` and
``register_v1_refusal`` answer what KServe answered 501 for (versioned metadata / readiness,
v1 ``:predict`` / ``:explain``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect

from runtime.draining import SHUTDOWN_MESSAGE, DeadlinePassed, ShutdownDeadline
from runtime.errors import internal_error_message
from runtime.http_limits import DEFAULT_MAX_BODY_BYTES
from runtime.json_body import JSONBodyError, parse_json
from runtime.openai_routes import EngineStreamingResponse, run_until_disconnect
from runtime.openapi import request_body
from runtime.v2_codec import (
    DecodedRequest,
    Tensor,
    V2Error,
    decode_rest_request,
    encode_rest_response,
    tensor_to_json_value,
)
from runtime.v2_dataplane import MODEL_VERSION, NO_REPOSITORY, Piece, V2DataPlane, output_tensors, parse_request

logger = logging.getLogger("vlmserve.v2")
DEFAULT_VERSION = MODEL_VERSION


def error_response(err: V2Error) -> JSONResponse:
    return JSONResponse(status_code=err.status, content={"error": err.message})


def _internal(exc: BaseException) -> V2Error:
    return V2Error(internal_error_message(logger, exc, "v2 request failed"), 500)


def shutdown_error() -> V2Error:
    return V2Error(SHUTDOWN_MESSAGE, 503)


async def _handle(request: Request, call: Callable[[], Awaitable[Response]], deadline: ShutdownDeadline) -> Response:
    try:
        await request.body()  # read before the disconnect watcher takes over receive()
    except ClientDisconnect:
        return Response(status_code=499)

    async def guarded() -> Response:
        try:
            return await call()
        except V2Error as err:
            return error_response(err)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            return error_response(_internal(exc))

    try:
        return await deadline.before_deadline(run_until_disconnect(request, guarded()))
    except DeadlinePassed:
        return error_response(shutdown_error())


# -- generate extension: JSON object <-> tensors ---------------------------------------------------
class V2GenerateRequest(BaseModel):
    """The body ``_generate_inputs`` takes, for the OpenAPI schema only (validation is
    ``_generate_inputs`` and ``parse_request``): Triton's generate extension, inputs by name."""

    model_config = ConfigDict(extra="forbid")
    text_input: str = Field(description="the prompt")
    image: str | list[str] = Field(default=None, description="encoded images, base64 (or data: URLs)")
    sampling_parameters: str | dict[str, Any] = Field(
        default=None, description="a JSON object (or its text): temperature, top_p, top_k, max_tokens, seed, ...")
    parameters: dict[str, Any] = Field(default=None, description="sampling parameters too (sampling_parameters wins)")
    stream: bool = Field(default=None, description="stream pieces (generate_stream only; its default)")
    exclude_input_in_output: bool = Field(default=None, description="text_output without the prompt")
    id: str = Field(default=None, description="echoed in the response")
    return_finish_reason: bool = Field(default=None, description="accepted and ignored (Triton's vLLM backend)")
    return_cumulative_logprob: bool = Field(default=None, description="accepted and ignored")
    return_logprobs: bool = Field(default=None, description="accepted and ignored")
    return_num_input_tokens: bool = Field(default=None, description="accepted and ignored")
    return_num_output_tokens: bool = Field(default=None, description="accepted and ignored")


def _generate_inputs(body: Any) -> DecodedRequest:
    if not isinstance(body, dict):
        raise V2Error("the request body must be a JSON object")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise V2Error("parameters: must be a JSON object")
    inputs = []
    for name, value in body.items():
        if name in ("parameters", "id"):
            continue
        if name == "sampling_parameters" and isinstance(value, dict):
            value = json.dumps(value)
        if isinstance(value, bool):
            inputs.append(Tensor(name, "BOOL", [1], [value]))
        elif isinstance(value, str):
            inputs.append(Tensor(name, "BYTES", [1], [value.encode()]))
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            inputs.append(Tensor(name, "BYTES", [len(value)], [v.encode() for v in value]))
        else:
            raise V2Error(f"input '{name}': expected a string, a list of strings or a boolean, "
                          f"got {type(value).__name__}")
    rid = body.get("id", "")
    return DecodedRequest(str(rid) if rid is not None else "", inputs, None, params)


def _generate_body(name: str, version: str, rid: str, piece: Piece) -> dict[str, Any]:
    body: dict[str, Any] = {"model_name": name, "model_version": version}
    if rid:
        body["id"] = rid
    for t in output_tensors(piece, None):
        body[t.name] = tensor_to_json_value(t)
    return body


async def _read_json(request: Request) -> Any:
    try:
        return parse_json(await request.body())
    except JSONBodyError as exc:
        raise V2Error(str(exc)) from exc


def build_v2_router(dataplane: V2DataPlane, deadline: ShutdownDeadline | None = None,
                    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> APIRouter:
    """``max_body_bytes``: the most a gzip / deflate infer body may inflate to (413 past it)."""
    router = APIRouter()
    deadline = deadline or ShutdownDeadline()
    shutdown_tail = f"data: {json.dumps({'error': SHUTDOWN_MESSAGE})}\n\n"

    async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
        async def call() -> Response:
            model = dataplane.resolve(model_name, model_version)
            headers = {k.lower(): v for k, v in request.headers.items()}
            decoded = decode_rest_request(await request.body(), headers, max_body_bytes)
            if model.is_embedding:
                tensors = await dataplane.embed(model, decoded)
            else:
                dataplane.check_outputs(decoded)
                req = parse_request(decoded, allow_stream=False)
                piece = await dataplane.infer(model, req)
                wanted = [o.name for o in decoded.outputs] if decoded.outputs is not None else None
                tensors = output_tensors(piece, wanted)
            flags = {o.name: o.binary for o in decoded.outputs or ()}
            binary = [flags.get(t.name) if flags.get(t.name) is not None else decoded.binary_default
                      for t in tensors]
            head: dict[str, Any] = {"model_name": model_name, "model_version": model_version or DEFAULT_VERSION}
            if decoded.id:
                head["id"] = decoded.id
            content, out_headers = encode_rest_response(head, tensors, binary)
            return Response(content=content, status_code=200, headers=out_headers,
                            media_type=out_headers.pop("content-type"))

        return await _handle(request, call, deadline)

    async def generate(request: Request, model_name: str, model_version: str | None = None) -> Response:
        async def call() -> Response:
            model = dataplane.resolve(model_name, model_version)
            decoded = _generate_inputs(await _read_json(request))
            req = parse_request(decoded, allow_stream=False)
            piece = await dataplane.infer(model, req)
            return JSONResponse(_generate_body(model_name, model_version or DEFAULT_VERSION, decoded.id, piece))

        return await _handle(request, call, deadline)

    async def generate_stream(request: Request, model_name: str, model_version: str | None = None) -> Response:
        async def call() -> Response:
            model = dataplane.resolve(model_name, model_version)
            body = await _read_json(request)
            decoded = _generate_inputs(body)
            if "stream" not in body and "stream" not in decoded.parameters:
                decoded.inputs.append(Tensor("stream", "BOOL", [1], [True]))
            req = parse_request(decoded, allow_stream=True)
            pieces = dataplane.generate(model, req)
            try:  # the first piece before the 200, so that prompt errors keep their 4xx status
                first = await pieces.__anext__()
            except StopAsyncIteration:
                first = None
            except BaseException:
                await pieces.aclose()
                raise
            version = model_version or DEFAULT_VERSION
            return EngineStreamingResponse(_sse(model_name, version, decoded.id, first, pieces),
                                           media_type="text/event-stream",
                                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                           deadline=deadline, shutdown_tail=shutdown_tail)

        return await _handle(request, call, deadline)

    for suffix in ("", "/versions/{model_version}"):
        base = "/v2/models/{model_name}" + suffix
        router.add_api_route(base + "/infer", infer, methods=["POST"], include_in_schema=not suffix)
        body = request_body(V2GenerateRequest)
        router.add_api_route(base + "/generate", generate, methods=["POST"], include_in_schema=not suffix,
                             openapi_extra=body)
        router.add_api_route(base + "/generate_stream", generate_stream, methods=["POST"],
                             include_in_schema=not suffix, openapi_extra=body)
    return router


async def _sse(name: str, version: str, rid: str, first: Piece | None,
               pieces: AsyncIterator[Piece]) -> AsyncIterator[str]:
    async with aclosing(pieces) as it:
        try:
            if first is not None:
                yield f"data: {json.dumps(_generate_body(name, version, rid, first))}\n\n"
            async for piece in it:
                yield f"data: {json.dumps(_generate_body(name, version, rid, piece))}\n\n"
        except V2Error as err:
            yield f"data: {json.dumps({'error': err.message})}\n\n"
        except Exception as exc:  # noqa: BLE001
            yield f"data: {json.dumps({'error': _internal(exc).message})}\n\n"


def register_v2_routes(app: FastAPI, dataplane: V2DataPlane, deadline: ShutdownDeadline | None = None,
                       max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Mount the v2 inference routes; call before KServe registers its own (FastAPI matches in
    order, so these answer ``/v2/models/{m}/infer`` instead of KServe's)."""
    app.include_router(build_v2_router(dataplane, deadline, max_body_bytes))


async def _no_repository() -> JSONResponse:
    # 405, not 404: a 404 on unload reads as "no such model", i.e. as if it were already unloaded.
    return JSONResponse(status_code=405, content={"error": NO_REPOSITORY}, headers={"Allow": ""})


def register_repository_refusal(app: FastAPI) -> None:
    """Refuse KServe's model repository extension; call before KServe registers its own routes
    (FastAPI matches in order, so this shadows KServe's ``/v2/repository/models/{m}/unload``)."""
    app.add_api_route("/v2/repository/{path:path}", _no_repository, include_in_schema=False,
                      methods=["GET", "POST", "PUT", "PATCH", "DELETE"])


# Why KServe's v1 protocol (:predict / :explain) is not served (KServe answered 501 for it).
NO_V1_PROTOCOL = ("vlmserve does not serve KServe's v1 protocol (:predict, :explain): use POST "
                  "/v2/models/{model}/infer, /v2/models/{model}/generate or /v1/chat/completions")


def register_version_routes(app: FastAPI, kserve_dataplane: Any) -> None:
    """Serve ``/v2/models/{m}/versions/{v}`` and ``.../ready``, and ``/v2/models/{m}`` and
    ``.../ready`` with a ``model_version`` query parameter: the one version each model has
    (``MODEL_VERSION``, or none given) answers as the model, another one 404 (KServe answered 501
    for any version). Call before KServe registers its own routes."""
    from kserve.protocol.rest.v2_endpoints import V2Endpoints

    endpoints = V2Endpoints(kserve_dataplane)

    def unknown(model_name: str, model_version: str) -> JSONResponse:
        return error_response(V2Error(f"Model {model_name} has no version {model_version!r}; it serves "
                                      f"version {MODEL_VERSION} only.", 404))

    async def metadata(model_name: str, model_version: str) -> Any:
        if model_version != MODEL_VERSION:
            return unknown(model_name, model_version)
        return await endpoints.model_metadata(model_name)

    async def ready(model_name: str, model_version: str) -> Any:
        if model_version != MODEL_VERSION:
            return unknown(model_name, model_version)
        return await endpoints.model_ready(model_name)

    base = "/v2/models/{model_name}/versions/{model_version}"
    app.add_api_route(base, metadata, methods=["GET"], include_in_schema=False)
    app.add_api_route(base + "/ready", ready, methods=["GET"], include_in_schema=False)

    # KServe's unversioned routes take the version as an optional query parameter too (in the
    # served schema, where schemathesis found the 501): answer it as the versioned routes do.
    async def metadata_query(model_name: str, model_version: str | None = None) -> Any:
        return await metadata(model_name, model_version or MODEL_VERSION)

    async def ready_query(model_name: str, model_version: str | None = None) -> Any:
        return await ready(model_name, model_version or MODEL_VERSION)

    app.add_api_route("/v2/models/{model_name}", metadata_query, methods=["GET"], include_in_schema=False)
    app.add_api_route("/v2/models/{model_name}/ready", ready_query, methods=["GET"], include_in_schema=False)


def register_v1_refusal(app: FastAPI) -> None:
    """Answer KServe v1's ``POST /v1/models/{m}:predict`` and ``:explain`` with a 404 naming the
    routes to use (OpenAI's error shape, as everything under /v1); call before KServe's routes."""

    async def refuse() -> JSONResponse:
        return JSONResponse(status_code=404, content={"error": {
            "message": NO_V1_PROTOCOL, "type": "not_found_error", "param": None, "code": "unsupported_protocol"}})

    for verb in ("predict", "explain"):
        app.add_api_route("/v1/models/{model_name}:" + verb, refuse, methods=["POST"], include_in_schema=False)
