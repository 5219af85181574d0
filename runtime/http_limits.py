"""Bounds on what one HTTP request may make the server read, and JSON for the errors that the
ASGI app never sees.

* ``RequestBodyMiddleware``: reads each request body before the app runs, at most
  ``max_body_bytes`` (``--max-request-body-bytes``; 413) within ``body_timeout`` seconds
  (``--request-body-timeout``; 408), so a client cannot hold a connection by sending half a body,
  nor make the server buffer an unbounded one. The app gets the body as one message.
* ``JSONErrorHTTPProtocol``: uvicorn's HTTP protocol, answering what it refuses before any app
  runs (a malformed request, a URL past ``MAX_URL_BYTES``) in JSON instead of plain text.
* ``error_body``: the JSON error of a path: OpenAI's shape under ``/v1`` and ``/openai``,
  KServe's ``{"error": "..."}`` elsewhere (the shapes those routes answer every other error in).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from runtime.auth import route_path

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0
# Longest request target accepted; nginx's default buffer is 8 KiB, and httptools itself cannot
# parse one of 64 KiB or more (its offsets are 16-bit).
MAX_URL_BYTES = 16 * 1024
# After a 413, how long the rest of the body is read and dropped before the connection closes:
# closing a socket with unread data sends a reset, which makes many clients lose the answer.
LINGER_S = 2.0

_OPENAI_PREFIXES = ("/v1/", "/openai/")
_TYPES = {400: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
          414: "invalid_request_error", 503: "service_unavailable_error"}


def error_body(path: str, status: int, message: str, code: str) -> bytes:
    """The JSON error for ``path``, in the shape of the routes under it."""
    if path.startswith(_OPENAI_PREFIXES) or path in ("/v1", "/openai"):
        payload: Any = {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                                  "param": None, "code": code}}
    else:
        payload = {"error": message}
    return json.dumps(payload).encode()


def error_headers(body: bytes, close: bool = True) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    return headers


class BodyTooLarge(Exception):
    pass


class RequestBodyMiddleware:
    """Read the whole request body up front, bounded in size and time (see the module doc)."""

    def __init__(self, app: Any, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)  # picks the error shape (OpenAI's under /v1)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._too_large(path, receive, send)
            return
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await self._read(receive)
        except TimeoutError:
            await _reply(send, path, 408, f"the request body was not received within {self.body_timeout:g} s "
                                          "(--request-body-timeout)", "request_timeout")
            return
        except BodyTooLarge:
            await self._too_large(path, receive, send)
            return
        if body is None:
            return  # the client went away
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Any) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, path: str, receive: Any, send: Any) -> None:
        """Answer 413, then read and drop what the client still sends for up to ``LINGER_S``
        before the connection closes (so that the client reads the answer, not a reset)."""
        body = error_body(path, 413, f"the request body exceeds the limit of {self.max_body_bytes} bytes "
                                     "(--max-request-body-bytes)", "request_too_large")
        await send({"type": "http.response.start", "status": 413, "headers": error_headers(body)})
        await send({"type": "http.response.body", "body": body, "more_body": True})
        try:
            async with asyncio.timeout(LINGER_S):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect" or not message.get("more_body", False):
                        break
        except TimeoutError:
            pass
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives ``body`` once, then the connection's own messages (disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(send: Any, path: str, status: int, message: str, code: str) -> None:
    body = error_body(path, status, message, code)
    await send({"type": "http.response.start", "status": status, "headers": error_headers(body)})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class JSONErrorHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol (httptools, else h11) whose own refusals are JSON: 414 for a
    request target past ``MAX_URL_BYTES``, 400 for anything else it cannot parse."""

    _url_too_long = False

    def on_url(self, url: bytes) -> None:  # httptools only
        super().on_url(url)
        if len(self.url) > MAX_URL_BYTES:
            self._url_too_long = True
            raise ValueError("URL too long")  # httptools stops parsing: data_received answers

    def send_400_response(self, msg: str) -> None:
        url = getattr(self, "url", b"") or b""
        path = url[:64].decode("latin-1").split("?", 1)[0]
        if self._url_too_long:
            status, message, code = 414, f"the request URL is longer than {MAX_URL_BYTES} bytes", "uri_too_long"
        else:
            status, message, code = 400, f"{msg.rstrip('.')}: malformed HTTP request line or headers", "invalid_http"
        body = error_body(path, status, message, code)
        head = [f"HTTP/1.1 {status} {'URI Too Long' if status == 414 else 'Bad Request'}\r\n".encode()]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        for name, value in error_headers(body):
            head.extend([name, b": ", value, b"\r\n"])
        self.transport.write(b"".join([*head, b"\r\n", body]))
        self.transport.close()
