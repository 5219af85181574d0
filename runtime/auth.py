"""API-key check for the HTTP server (``--api-key`` / ``$VLMSERVE_API_KEY``).

A pure ASGI middleware (so streaming and disconnect detection are untouched): requests to the
OpenAI routes (``/v1/...``, ``/openai/...``) and the v2 routes (``/v2/...``) must carry
``Authorization: Bearer KEY`` (the scheme in any case: ``bearer KEY`` too); health probes
(``/``, ``/v2/health/*``, ``/v2/models/{m}/ready``) and ``/metrics`` stay open. A missing or
wrong key gets a 401 in OpenAI's error shape. ``grpc_api_key_interceptor`` does the same for
the gRPC port (UNAUTHENTICATED).
"""

from __future__ import annotations

import hmac
import json
import re
from typing import Any

_PROTECTED = re.compile(r"^/(v1|openai|v2)(/|$)")
_OPEN = re.compile(r"^/v2/health/|^/v2/models/[^/]+(/versions/[^/]+)?/ready$")


def route_path(scope: dict) -> str:
    """The path routes match: ``scope["path"]`` without ``root_path`` (``--root-path``). uvicorn
    puts the root path in front of ``path`` (as ASGI says) and Starlette strips it before routing,
    so a check on the raw path would see ``/prefix/v1/...``, match no protected route and let a
    request without the key through."""
    path, root = scope.get("path", ""), scope.get("root_path", "").rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):] or "/"
    return path


def needs_api_key(path: str) -> bool:
    return bool(_PROTECTED.match(path)) and not _OPEN.match(path)


def bearer_matches(header: bytes | str, api_key: bytes) -> bool:
    """Whether an ``Authorization`` value is ``Bearer <api_key>``. The scheme is matched in any
    case (auth schemes are case-insensitive, RFC 9110 11.1; clients send ``bearer`` too); the
    key is compared in constant time."""
    value = header.encode() if isinstance(header, str) else header
    scheme, _, token = value.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), api_key)


class APIKeyMiddleware:
    """Reject protected requests without ``Authorization: Bearer <api_key>``."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self._api_key = api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not needs_api_key(route_path(scope)):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        if bearer_matches(given, self._api_key):
            await self.app(scope, receive, send)
            return
        message = "Missing API key: send 'Authorization: Bearer <key>'" if not given else "Incorrect API key provided"
        body = json.dumps({"error": {"message": message, "type": "authentication_error", "param": None,
                                     "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def grpc_api_key_interceptor(api_key: str) -> Any:
    """A ``grpc.aio`` server interceptor asking the same ``authorization: Bearer KEY`` metadata
    (scheme in any case) of every RPC except the health ones (ServerLive, ServerReady, ModelReady)."""
    import grpc

    expected = api_key.encode()
    open_methods = ("/ServerLive", "/ServerReady", "/ModelReady")

    async def deny(request: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "Missing or incorrect API key "
                                                             "(send metadata 'authorization: Bearer <key>')")

    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler,
    }

    class APIKeyInterceptor(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            handler = await continuation(details)
            if handler is None or details.method.endswith(open_methods):
                return handler
            given = dict(details.invocation_metadata or ()).get("authorization", "")
            if bearer_matches(given, expected):
                return handler
            factory = factories[(handler.request_streaming, handler.response_streaming)]
            return factory(deny, request_deserializer=handler.request_deserializer,
                           response_serializer=handler.response_serializer)

    return APIKeyInterceptor()
