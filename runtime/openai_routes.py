"""OpenAI-compatible HTTP routes (the transport layer) on KServe's FastAPI app.

``register_openai_routes(app, dataplane)`` mounts, under ``/v1`` and ``/openai/v1``:
``POST chat/completions``, ``POST completions``, ``POST embeddings``, ``GET models``, ``GET models/{id}``
(503 until the model is ready); ``register_health_route`` adds vLLM's ``GET /health``.

This layer only parses JSON into the protocol models, calls the ``OpenAIDataPlane``, and writes
JSON or server-sent events. Errors are answered in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``. A client that goes away cancels its request:
streams close their engine iterators (which aborts the engine request) and non-streaming
handlers are cancelled when the connection drops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from runtime.draining import SHUTDOWN_MESSAGE, DeadlinePassed, ShutdownDeadline
from runtime.errors import internal_error_message
from runtime.json_body import JSONBodyError, parse_json
from runtime.openai_dataplane import OpenAIDataPlane, OpenAIError, bad_request
from runtime.openapi import request_body
from runtime.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)

logger = logging.getLogger("vlmserve.openai")

OPENAI_PREFIXES = ("/v1", "/openai/v1")
_Req = TypeVar("_Req", bound=BaseModel)


def json_response(body: BaseModel, status: int = 200) -> Response:
    return Response(content=body.model_dump_json(), status_code=status, media_type="application/json")


def error_response(err: OpenAIError) -> Response:
    return json_response(err.response(), err.status)


def _internal_error(exc: BaseException) -> OpenAIError:
    return OpenAIError(500, internal_error_message(logger, exc), type="internal_server_error",
                       code="internal_error")


async def parse_request(request: Request, cls: type[_Req]) -> _Req:
    """The JSON body as ``cls``; malformed JSON or invalid fields -> 400 naming the problem."""
    body = await request.body()
    try:
        data: Any = parse_json(body)
    except JSONBodyError as exc:
        raise bad_request(str(exc), exc.field, code="invalid_json") from exc
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(p) for p in e["loc"]) or "body"
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}")
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        raise bad_request("; ".join(problems), str(first[0]) if first else None) from exc


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run ``work``, cancelling it if the client disconnects first (its engine request is then
    aborted by the cancellation)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    logger.info("client disconnected; request cancelled")
    return Response(status_code=499)


class EngineStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator (so a disconnect or a shutdown
    aborts the engine request at once instead of whenever the generator is collected) and, given
    a ``deadline``, ends with ``shutdown_tail`` (the route's final error event) when the shutdown
    grace period ends before the stream does."""

    def __init__(self, *args: Any, deadline: ShutdownDeadline | None = None, shutdown_tail: str = "",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        self._shutdown_tail = shutdown_tail.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    async def stream_response(self, send: Any) -> None:
        if self._deadline is None:
            await super().stream_response(send)
            return
        started = False

        async def tracked(message: Any) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self._deadline.before_deadline(super().stream_response(tracked))
        except DeadlinePassed:
            # Cancelled between two sends (uvicorn writes each event whole), so the tail follows
            # a complete event.
            if not started:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": self._shutdown_tail, "more_body": False})


def shutdown_error() -> OpenAIError:
    return OpenAIError(503, SHUTDOWN_MESSAGE, type="service_unavailable_error", code="server_shutting_down")


async def sse_events(first: BaseModel | None, chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Server-sent events: one ``data: {json}`` per chunk, then ``data: [DONE]``. An error after
    the stream started is sent as an ``{"error": ...}`` event before ``[DONE]``."""
    async with aclosing(chunks) as it:
        try:
            if first is not None:
                yield f"data: {first.model_dump_json()}\n\n"
            async for chunk in it:
                yield f"data: {chunk.model_dump_json()}\n\n"
        except OpenAIError as err:
            yield f"data: {err.response().model_dump_json()}\n\n"
        except Exception as exc:  # noqa: BLE001
            yield f"data: {_internal_error(exc).response().model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


async def _respond(result: BaseModel | AsyncIterator[BaseModel], deadline: ShutdownDeadline) -> Response:
    """JSON for a response; SSE for a stream, whose first chunk is awaited here so that errors
    found when the engine takes the request are still answered with their 4xx status."""
    if isinstance(result, BaseModel):
        return json_response(result)
    try:
        first = await result.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await result.aclose()
        raise
    tail = f"data: {shutdown_error().response().model_dump_json()}\n\ndata: [DONE]\n\n"
    return EngineStreamingResponse(sse_events(first, result), media_type="text/event-stream",
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                   deadline=deadline, shutdown_tail=tail)


async def _handle(request: Request, call: Callable[[], Awaitable[Response]], deadline: ShutdownDeadline) -> Response:
    # Read the body first: the disconnect watcher must not consume the body's ASGI messages.
    try:
        await request.body()
    except ClientDisconnect:
        return Response(status_code=499)

    async def guarded() -> Response:
        try:
            return await call()
        except OpenAIError as err:
            return error_response(err)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            return error_response(_internal_error(exc))

    try:
        return await deadline.before_deadline(run_until_disconnect(request, guarded()))
    except DeadlinePassed:
        return error_response(shutdown_error())


def build_openai_router(dataplane: OpenAIDataPlane, deadline: ShutdownDeadline | None = None) -> APIRouter:
    router = APIRouter()
    deadline = deadline or ShutdownDeadline()

    async def chat_completions(request: Request) -> Response:
        async def call() -> Response:
            req = await parse_request(request, ChatCompletionRequest)
            return await _respond(await dataplane.create_chat_completion(req), deadline)

        return await _handle(request, call, deadline)

    async def completions(request: Request) -> Response:
        async def call() -> Response:
            req = await parse_request(request, CompletionRequest)
            return await _respond(await dataplane.create_completion(req), deadline)

        return await _handle(request, call, deadline)

    async def embeddings(request: Request) -> Response:
        async def call() -> Response:
            req = await parse_request(request, EmbeddingRequest)
            return json_response(await dataplane.create_embedding(req))

        return await _handle(request, call, deadline)

    async def list_models() -> Response:
        try:
            return json_response(dataplane.list_models())
        except OpenAIError as err:
            return error_response(err)

    async def get_model(model_id: str) -> Response:
        try:
            return json_response(dataplane.model_card(model_id))
        except OpenAIError as err:
            return error_response(err)

    router.add_api_route("/chat/completions", chat_completions, methods=["POST"],
                         openapi_extra=request_body(ChatCompletionRequest))
    router.add_api_route("/completions", completions, methods=["POST"], openapi_extra=request_body(CompletionRequest))
    router.add_api_route("/embeddings", embeddings, methods=["POST"], openapi_extra=request_body(EmbeddingRequest))
    router.add_api_route("/models", list_models, methods=["GET"])
    router.add_api_route("/models/{model_id:path}", get_model, methods=["GET"])
    return router


def register_openai_routes(app: FastAPI, dataplane: OpenAIDataPlane,
                           prefixes: tuple[str, ...] = OPENAI_PREFIXES,
                           deadline: ShutdownDeadline | None = None) -> None:
    """Mount the OpenAI routes under each prefix. Call before KServe registers its own routes, so
    that ``GET /v1/models[/{id}]`` answers OpenAI's shape rather than KServe v1's. ``deadline``:
    the end of the shutdown grace period (``runtime.draining``)."""
    router = build_openai_router(dataplane, deadline)
    for prefix in prefixes:
        app.include_router(router, prefix=prefix)


def register_health_route(app: FastAPI, ready: Callable[[], Awaitable[bool]]) -> None:
    """vLLM's ``GET /health``: 200 (empty body, as vLLM) once the server is ready, 503 before
    (loading) and while shutting down, so that an OpenAI-side probe means what
    ``/v2/health/ready`` means. Open without the API key, as vLLM's."""

    async def health() -> Response:
        if await ready():
            return Response(status_code=200)
        return error_response(OpenAIError(503, "The server is not ready (the model is loading or the server is "
                                               "shutting down).", type="service_unavailable_error",
                                          code="server_not_ready"))

    app.add_api_route("/health", health, methods=["GET"], include_in_schema=False)
