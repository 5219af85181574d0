"""``VLMRESTServer``: KServe's REST server (uvicorn + KServe's FastAPI app), quieter.

What KServe logs that a serving runtime under probes and load should not:

* two ``kserve.trace`` lines (wall and CPU time) for every request, from its TimingMiddleware:
  the middleware is left out (uvicorn's access line stays, one per request, as vLLM's);
* a full traceback for every client error it answers itself (unknown model 404, bad input
  400, not ready 503): those are answered in the same JSON shape (``{"error": ...}``) with no log
  line, since a client's mistake or a probe during start-up is no server error;
* "OpenAI endpoints not registered" and "Time series endpoints not registered": KServe looks for
  its own OpenAI model classes; vlmserve serves its own OpenAI routes (``runtime.openai_routes``,
  mounted earlier), so those registrations are skipped, not reported as missing.

Uvicorn's log level (``--uvicorn-log-level``), the ASGI ``root_path`` (``--root-path``) and, with
``reuse_port``, a socket that other API server processes bind too, are set here as well.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from kserve.errors import InvalidInput, ModelNotFound
from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
from kserve.protocol.rest.v2_endpoints import register_v2_endpoints

from runtime._kserve import ModelNotReady, RESTServer, ServerNotReady


# KServe's metadata routes answer with ORJSONResponse, which FastAPI warns about on each request.
warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")


def _quiet(status: int):
    async def handler(_: Any, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": str(exc)})

    return handler


class VLMRESTServer(RESTServer):
    reuse_port = False

    def configure(self, host: str, uvicorn_log_level: str | None = None, root_path: str = "") -> None:
        self.config.host = host
        self.config.root_path = root_path
        if uvicorn_log_level:
            # KServe passes log_config=None (it configures logging itself), so uvicorn's level is
            # set on its loggers directly; "trace" is uvicorn's level below debug.
            level = logging.getLevelName(uvicorn_log_level.upper()) if uvicorn_log_level != "trace" else 5
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
                logging.getLogger(name).setLevel(level)

    async def start(self) -> None:
        if not self.reuse_port:
            await super().start()
            return
        from runtime.api_servers import reuse_port_socket

        self.create_application()
        sock = reuse_port_socket(self.config.host, self.config.port)
        await self._server.serve(sockets=[sock])

    def _add_middlewares(self, app: Any) -> None:
        if self.access_log_format:  # KServe's access-log middleware, without its TimingMiddleware
            from asgi_logger import AccessLoggerMiddleware

            logging.getLogger("uvicorn.access").handlers = []
            app.add_middleware(AccessLoggerMiddleware, format=self.access_log_format)
            logging.getLogger("access").propagate = False

    def _register_endpoints(self, app: Any) -> None:
        root_router = APIRouter()
        root_router.add_api_route(r"/", self.dataplane.live)
        app.include_router(root_router)
        register_v1_endpoints(app, self.dataplane, self.model_repository_extension)
        register_v2_endpoints(app, self.dataplane, self.model_repository_extension)

    def _add_exception_handlers(self, app: Any) -> None:
        super()._add_exception_handlers(app)
        app.add_exception_handler(ModelNotFound, _quiet(404))
        app.add_exception_handler(InvalidInput, _quiet(400))
        # "Not ready" is what readiness probes ask for every few seconds while the model loads.
        app.add_exception_handler(ServerNotReady, _quiet(503))
        app.add_exception_handler(ModelNotReady, _quiet(503))
