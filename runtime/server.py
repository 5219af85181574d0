"""The model server: KServe's ModelServer with our routes, lifecycle and shutdown.

``VLMModelServer`` keeps KServe's pieces (FastAPI app with v1/v2 REST and ``/metrics``, the v2
gRPC servicer, ``DataPlane``, ``ModelRepository``) and changes what a generative engine needs:

* the HTTP server listens at once; models load in the background (``model.start_engine()``),
  and ``/v2/health/ready`` and ``/v2/models/{m}/ready`` answer 503 until every model is warm
  (and whenever a model the server started with is unhealthy or missing from the registry);
* KServe's model repository extension (load / unload) is not served: one model, loaded at
  start-up (``runtime.v2_routes.register_repository_refusal``; 405, gRPC UNIMPLEMENTED);
* both the HTTP and the gRPC server bind ``host`` (KServe hard-codes 0.0.0.0 and [::]);
* it mounts the OpenAI routes (``runtime.openai_routes``) with vLLM's ``/health`` (the same
  readiness), Triton's model configuration (``runtime.model_config``), the API-key checks (HTTP
  middleware and gRPC interceptor), CORS with ``--allowed-origins``, and the engine gauges on
  ``/metrics`` (served by ``runtime.metrics_exposition``, which keeps vLLM's names in
  OpenMetrics); KServe's REST server is quieted (``runtime.rest_server``) and one banner lists
  the endpoints at start-up (``runtime.banner``);
* what KServe answered 5xx or plain text for answers 4xx in JSON: model versions other than "1"
  (404), KServe v1 ``:predict`` / ``:explain`` (404), requests uvicorn cannot parse (400, 414);
  request bodies are bounded in size and time (``runtime.http_limits``: 413, 408);
* SIGTERM / SIGINT: stop accepting connections, let in-flight requests finish (streams
  included) for up to ``grace_period`` seconds; then each request still running answers for
  itself (``runtime.draining``: 503 in JSON, a stream's final error event, a gRPC stream's error
  response, gRPC UNAVAILABLE), then stop gRPC and the engines, exit 0.
  A model that fails to load, or an engine that dies, ends the server with exit code 1.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from engine.config import EngineArgs
from runtime._kserve import (
    FASTAPI_APP_IMPORT_STRING,
    DataPlane,
    GRPCServer,
    ModelRepositoryExtension,
    kserve,
    model_server,
)
from runtime.args import FrontendArgs
from runtime.auth import APIKeyMiddleware, grpc_api_key_interceptor
from runtime.banner import banner
from runtime.draining import SERVER_MARGIN_S, ShutdownDeadline
from runtime.http_limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    JSONErrorHTTPProtocol,
    RequestBodyMiddleware,
)
from runtime.metrics import register_engine_metrics
from runtime.metrics_exposition import register_metrics_route
from runtime.model import VLMModel
from runtime.model_config import register_model_config_routes
from runtime.openai_dataplane import OpenAIDataPlane
from runtime.openai_routes import register_health_route, register_openai_routes
from runtime.openapi import publish_request_schemas
from runtime.rest_server import VLMRESTServer
from runtime.v2_dataplane import NO_REPOSITORY, V2DataPlane
from runtime.v2_routes import (
    register_repository_refusal,
    register_v1_refusal,
    register_v2_routes,
    register_version_routes,
)

logger = logging.getLogger("vlmserve.server")
ENGINE_WATCH_INTERVAL_S = 1.0


@dataclass
class ServerConfig:
    """Where and how to listen (KServe's flags, plus ``host``)."""

    host: str = "0.0.0.0"
    http_port: int = 8080
    grpc_port: int = 8081
    enable_grpc: bool = True
    grace_period: int = 30
    max_threads: int = 4
    timeout_keep_alive: int = 65
    access_log_format: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # --max-request-body-bytes
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S  # --request-body-timeout
    kserve_args: dict[str, Any] = field(default_factory=dict)  # KServe's parsed flags, if any
    # --api-server-count: this process and N - 1 copies of it (``command``) share the engine core
    # and the ports (runtime.api_servers); ``reuse_port`` binds HTTP so that they can.
    api_server_count: int = 1
    command: list[str] = field(default_factory=list)
    reuse_port: bool = False
    # vLLM's front-end flags (runtime.compat_args): uvicorn's log level, the path prefix a proxy
    # strips (ASGI root_path), CORS origins (None: no CORS headers, as before).
    uvicorn_log_level: str | None = None
    root_path: str = ""
    allowed_origins: list[str] | None = None


class ReadinessDataPlane(DataPlane):
    """KServe's DataPlane, with readiness judged on the models the server started with.

    A started model must be healthy and still in KServe's registry under each of its names: one
    missing from the registry (as after a KServe unload) makes the server and that model
    unready (503), where iterating the registry would silently stop counting it."""

    def __init__(self, model_registry: Any, started: Callable[[], Sequence[VLMModel]]) -> None:
        super().__init__(model_registry=model_registry)
        self._started = started

    def _served(self) -> dict[str, VLMModel]:
        return {name: model for model in self._started() for name in model.served_names}

    async def _serving(self, name: str, model: VLMModel) -> bool:
        return self.model_registry.get_model(name) is model and await model.healthy()

    async def ready(self) -> bool:
        for name, model in self._served().items():
            if not await self._serving(name, model):
                return False
        return await super().ready()

    async def model_ready(self, model_name: str, disable_predictor_health_check: bool = False) -> bool:
        model = self._served().get(model_name)
        if model is None:  # not ours: KServe's answer (404 for an unknown name)
            return await super().model_ready(model_name, disable_predictor_health_check)
        return await self._serving(model_name, model)

    def metadata(self) -> dict:
        # The repository extension is not served, so it is not advertised either.
        meta = super().metadata()
        return {**meta, "extensions": [e for e in meta["extensions"] if e != "model_repository_extension"]}


class NoRepositoryExtension(ModelRepositoryExtension):
    """Given to KServe's REST and gRPC servers in place of theirs. Our routes and servicer already
    refuse the repository calls; this makes any path to KServe's own handlers refuse too (501)
    instead of unloading the model."""

    async def index(self, filter_ready: bool | None = False) -> list[dict[str, str]]:
        raise NotImplementedError(NO_REPOSITORY)

    async def load(self, model_name: str) -> None:
        raise NotImplementedError(NO_REPOSITORY)

    async def unload(self, model_name: str) -> None:
        raise NotImplementedError(NO_REPOSITORY)


class VLMGRPCServer(GRPCServer):
    """KServe's v2 gRPC server with our servicer (``runtime.v2_grpc``: every rpc of
    ``inference.GRPCInferenceService``, ModelInfer and Triton's ModelStreamInfer included) in
    place of KServe's, plus the API-key interceptor when a key is set."""

    def __init__(self, *args: Any, host: str = "0.0.0.0", api_key: str | None = None,
                 v2_dataplane: V2DataPlane | None = None, deadline: ShutdownDeadline | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._host = host
        self._api_key = api_key
        self._v2_dataplane = v2_dataplane
        self._deadline = deadline

    async def start(self, max_workers: int) -> None:
        from grpc import aio
        from kserve.protocol.grpc.interceptors import (
            ExceptionToStatusInterceptor,
            LoggingInterceptor,
        )

        from runtime.v2_grpc import add_v2_servicer

        interceptors: list[Any] = [LoggingInterceptor(), ExceptionToStatusInterceptor()]
        if self._api_key:
            interceptors.insert(0, grpc_api_key_interceptor(self._api_key))
        self._server = aio.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors,
            options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                     ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length"))],
        )
        add_v2_servicer(self._server, self._data_plane,
                        self._v2_dataplane or V2DataPlane(self._data_plane.model_registry), self._deadline)
        # Where the HTTP server binds too (KServe's [::] would also listen on every interface).
        address = grpc_address(self._host, self._port)
        self._server.add_insecure_port(address)
        logger.info("gRPC server on %s", address)
        await self._server.start()
        await self._server.wait_for_termination()


def grpc_address(host: str, port: int) -> str:
    """``host:port`` for gRPC, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def configure_logging() -> None:
    """Give our ``vlmserve.*`` loggers KServe's format (KServe configures only its own)."""
    log = logging.getLogger("vlmserve")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(kserve.logging.KSERVE_LOGGER_FORMAT,
                                               kserve.logging.KSERVE_LOGGER_DATE_FORMAT))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class VLMModelServer(kserve.ModelServer):
    def __init__(self, config: ServerConfig) -> None:
        super().__init__(
            http_port=config.http_port, grpc_port=config.grpc_port, workers=1, max_threads=config.max_threads,
            enable_grpc=config.enable_grpc, access_log_format=config.access_log_format,
            timeout_keep_alive=config.timeout_keep_alive, grace_period=config.grace_period,
            ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile,
        )
        configure_logging()
        self.config = config
        self.models: list[VLMModel] = []
        self.dataplane = ReadinessDataPlane(self.registered_models, started=lambda: self.models)
        self.model_repository_extension = NoRepositoryExtension(self.registered_models)
        self.exit_code = 0
        self._stopping = False
        self.copies: Any = None  # runtime.api_servers.APIServerCopies with --api-server-count > 1
        if config.api_server_count > 1:
            from runtime.api_servers import APIServerCopies

            self.copies = APIServerCopies(config.api_server_count, config.command)
        self.deadline = ShutdownDeadline()  # the end of the grace period after SIGTERM

    # -- set-up -------------------------------------------------------------------------------------
    def _build_app(self) -> None:
        app = model_server.app
        # Starlette runs the middleware added last first: the key is checked before a body is read.
        app.add_middleware(RequestBodyMiddleware, max_body_bytes=self.config.max_body_bytes,
                           body_timeout=self.config.body_timeout)
        if self.config.api_key:
            app.add_middleware(APIKeyMiddleware, api_key=self.config.api_key)
        if self.config.allowed_origins is not None:  # outermost: preflights answered before the key check
            from fastapi.middleware.cors import CORSMiddleware

            app.add_middleware(CORSMiddleware, allow_origins=self.config.allowed_origins, allow_credentials=False,
                               allow_methods=["*"], allow_headers=["*"])
        # Ours first: FastAPI matches in order, so GET /v1/models answers OpenAI's shape.
        register_openai_routes(app, OpenAIDataPlane(self.registered_models), deadline=self.deadline)
        register_health_route(app, self.dataplane.ready)  # vLLM's /health, what /v2/health/ready says
        v2 = V2DataPlane(self.registered_models)
        # v2 infer / generate / generate_stream, ahead of KServe's infer
        register_v2_routes(app, v2, self.deadline, self.config.max_body_bytes)
        register_model_config_routes(app, self.registered_models)  # Triton's; KServe has none
        register_version_routes(app, self.dataplane)  # ahead of KServe's 501 for any version
        register_v1_refusal(app)  # ahead of KServe's :predict / :explain (501)
        register_repository_refusal(app)  # ahead of KServe's load / unload
        publish_request_schemas(app)
        register_engine_metrics(lambda: [(m.name, m) for m in self.models])
        register_metrics_route(app)  # ahead of KServe's: vLLM's names intact in OpenMetrics

        # uvicorn and gRPC cancel what is left SERVER_MARGIN_S after our deadline: by then every
        # request has answered for itself (runtime.draining).
        hard_stop = self.grace_period + SERVER_MARGIN_S
        self._rest_server = VLMRESTServer(
            FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension, self.http_port,
            access_log_format=self.access_log_format, workers=1, grace_period=hard_stop,
            event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile,
        )
        self._rest_server.configure(self.config.host, self.config.uvicorn_log_level, self.config.root_path)
        self._rest_server.reuse_port = self.config.reuse_port or self.config.api_server_count > 1
        self._rest_server.config.http = JSONErrorHTTPProtocol  # JSON for what uvicorn refuses itself
        if self.enable_grpc:
            kwargs = dict(vars(model_server.args), **self.config.kserve_args)
            self._grpc_server = VLMGRPCServer(self.grpc_port, self.dataplane, self.model_repository_extension,
                                              kwargs=kwargs, grace_period=hard_stop, host=self.config.host,
                                              api_key=self.config.api_key, v2_dataplane=v2, deadline=self.deadline)

    def start(self, models: Sequence[VLMModel]) -> int:  # type: ignore[override]
        """Serve until a signal (or a fatal model error); returns the process exit code."""
        for model in models:
            for name in model.served_names:
                self.register_model(model, name)
            model.enable_latency_logging = self.enable_latency_logging
            self.models.append(model)
        self._build_app()
        asyncio.run(self._serve_all())
        return self.exit_code

    # -- running --------------------------------------------------------------------------------------
    async def _serve_all(self) -> None:
        self.setup_event_loop()
        loop = asyncio.get_running_loop()
        # Starlette streams in an anyio task group, whose first use imports anyio's asyncio backend
        # (~20 ms): done here, not in the first stream (whose tokens it held back and bunched).
        async with anyio.create_task_group():
            pass
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._request_stop, f"signal {signal.Signals(sig).name}")
        helpers = [asyncio.create_task(self._load(m), name=f"load-{m.name}") for m in self.models]
        if not self.config.reuse_port:  # the head process (copies of --api-server-count say nothing)
            logger.info("%s", banner(self.models[0].served_names, self.config.host, self.http_port,
                                     self.grpc_port if self.enable_grpc else None,
                                     tls=bool(self.ssl_certfile), root_path=self.config.root_path,
                                     api_key=bool(self.config.api_key),
                                     api_server_count=self.config.api_server_count))
        if self.config.reuse_port and not self.copies:
            # A copy sharing the head's ports (--api-server-count) binds them only once its model is
            # ready: the kernel hands it connections as soon as it listens, and the head already
            # reports the pod ready.
            await asyncio.gather(*helpers)
            if self._stopping:
                await loop.run_in_executor(None, self._stop_models)
                return
        rest = asyncio.create_task(self._rest_server.start(), name="rest")
        grpc = asyncio.create_task(self._grpc_server.start(self.max_threads), name="grpc") if self.enable_grpc else None
        helpers.append(asyncio.create_task(self._watch_engines(), name="engine-watch"))
        try:
            await rest  # returns once uvicorn has drained (or failed to start)
        finally:
            self._stopping = True
            for task in helpers:
                task.cancel()
            for model in self.models:
                model.ready = False
            if grpc is not None:
                await self._grpc_server.stop()
                await asyncio.gather(grpc, return_exceptions=True)
            if self.copies is not None:  # they drain their own requests; the engine outlives them
                self.copies.terminate()
                await loop.run_in_executor(None, self.copies.wait, self.grace_period + 10)
            # Engines stop last: uvicorn has already aborted (closed) whatever was still in flight.
            await loop.run_in_executor(None, self._stop_models)
            await asyncio.gather(*helpers, return_exceptions=True)
            logger.info("server stopped (exit code %d)", self.exit_code)

    def _request_stop(self, reason: str, exit_code: int = 0) -> None:
        if exit_code:
            self.exit_code = exit_code
        if self._stopping:
            return
        self._stopping = True
        logger.info("shutting down (%s)", reason)
        for model in self.models:
            model.ready = False
        server = self._rest_server._server  # uvicorn.Server: finish in-flight requests, then return
        server.should_exit = True
        if self.copies is not None:
            self.copies.terminate()  # they drain at the same time as this one
        # Past the grace period, every request still running answers with an error (503, or a
        # stream's last event) instead of being cut off by uvicorn.
        asyncio.get_running_loop().call_later(self.grace_period, self.deadline.expire)

    async def _load(self, model: VLMModel) -> None:
        """Load one model in a daemon thread (an interrupted start must not block exit)."""
        model._loop = asyncio.get_running_loop()  # the warm-up runs on this loop
        future: concurrent.futures.Future = concurrent.futures.Future()

        def work() -> None:
            try:
                future.set_result(model.load())
            except BaseException as exc:  # noqa: BLE001
                future.set_exception(exc)

        threading.Thread(target=work, name=f"vlmserve-load-{model.name}", daemon=True).start()
        try:
            ready = await asyncio.wrap_future(future)
            if ready and self.copies is not None and not self._stopping:
                self.copies.start(model.llm.core_address)  # the engine core is up: share it
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._stopping:
                logger.error("model %s failed to load: %s", model.name, exc, exc_info=exc)
                self._request_stop(f"model {model.name} failed to load", exit_code=1)

    async def _watch_engines(self) -> None:
        """A dead engine core cannot recover: stop the server (exit 1) so that it gets restarted."""
        while True:
            await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
            for model in self.models:
                llm = model.llm
                if llm is not None and model.ready and not llm.is_running:
                    logger.error("the engine of model %s died", model.name)
                    self._request_stop(f"engine of {model.name} died", exit_code=1)
                    return
            if self.copies is not None and self.copies.died() and not self._stopping:
                logger.error("an API server process ended (exit codes %s)", self.copies.died())
                self._request_stop("an API server process ended", exit_code=1)
                return

    def _stop_models(self) -> None:
        for model in self.models:
            try:
                model.stop()
            except Exception as exc:  # noqa: BLE001
                logger.error("stopping model %s failed: %s", model.name, exc)


def build_model(name: str, engine_args: EngineArgs, frontend: FrontendArgs) -> VLMModel:
    return VLMModel(name, engine_args, served_names=frontend.served_model_names, chat_template=frontend.chat_template)


def check_engine_args(engine_args: EngineArgs) -> None:
    """Fail fast (before binding ports) on a bad model path or inconsistent flags: ValueError/OSError."""
    engine_args.create_engine_config()


def serve(model: VLMModel, config: ServerConfig) -> int:
    """Run the server for one model; returns the exit code (0 after a signal, 1 on a fatal error)."""
    return VLMModelServer(config).start([model])
