"""The gRPC ``inference.GRPCInferenceService`` (KServe v2 + Triton's ``ModelStreamInfer``).

``V2InferenceServicer`` answers every rpc of ``protos/v2_grpc_predict.proto`` (compiled into
``runtime.v2_grpc_predict_pb2*``; see ``protos/generate.py``) and replaces KServe's servicer,
which has no streaming rpc:

* ServerLive / ServerReady / ModelReady / ServerMetadata / ModelMetadata: KServe's DataPlane;
* ModelConfig: Triton's model configuration (``runtime.model_config``, the same as over HTTP);
* ModelInfer: one generation (``stream`` must be false), outputs in ``raw_output_contents``;
* ModelStreamInfer: requests are served concurrently as they arrive; a request with input
  ``stream`` = true gets one response per new piece of text, the last carrying
  ``finish_reason``; a request without gets one response. Every response carries parameter
  ``triton_final_response`` (true on a request's last one), as Triton's decoupled models do. A
  failed request gets ``error_message`` (with its id) and the stream goes on;
* RepositoryModelLoad / Unload: UNIMPLEMENTED (one model, loaded at start-up; an unload would
  stop it for good). The proto has no RepositoryIndex, so gRPC answers that one UNIMPLEMENTED too.

Errors (unary rpcs): bad input INVALID_ARGUMENT, unknown model (or a ``model_version`` other
than "1") NOT_FOUND, not ready UNAVAILABLE, through KServe's exception interceptor
(``grpc_interceptor`` exceptions). When the shutdown grace period ends (``runtime.draining``), a
ModelInfer still running answers UNAVAILABLE, and each request of a ModelStreamInfer still running
gets its final response with ``error_message``; then the stream ends.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import Any

from grpc_interceptor import exceptions as grpc_exc

from runtime import v2_grpc_predict_pb2 as pb
from runtime import v2_grpc_predict_pb2_grpc as pb_grpc
from runtime.draining import SHUTDOWN_MESSAGE, DeadlinePassed, ShutdownDeadline
from runtime.errors import internal_error_message
from runtime.model_config import model_config, model_config_proto, resolve_for_config
from runtime.v2_codec import V2Error, decode_grpc_request, encode_grpc_response
from runtime.v2_dataplane import MODEL_VERSION, NO_REPOSITORY, Piece, V2DataPlane, output_tensors, parse_request

logger = logging.getLogger("vlmserve.v2.grpc")
DEFAULT_VERSION = MODEL_VERSION
FINAL = "triton_final_response"


def grpc_error(err: V2Error) -> grpc_exc.GrpcException:
    if err.status == 404:
        return grpc_exc.NotFound(err.message)
    if err.status == 503:
        return grpc_exc.Unavailable(err.message)
    if err.status == 413:
        return grpc_exc.ResourceExhausted(err.message)
    if err.status >= 500:
        return grpc_exc.Internal(err.message)
    return grpc_exc.InvalidArgument(err.message)


class V2InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, data_plane: Any, v2: V2DataPlane, deadline: ShutdownDeadline | None = None) -> None:
        self._data_plane = data_plane  # KServe's DataPlane (health, metadata)
        self._v2 = v2
        self._deadline = deadline or ShutdownDeadline()  # the end of the shutdown grace period

    # -- health and metadata ---------------------------------------------------------------------
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=(await self._data_plane.live())["status"] == "alive")

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=await self._data_plane.ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=await self._data_plane.model_ready(model_name=request.name))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        meta = self._data_plane.metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        meta = await self._data_plane.model_metadata(model_name=request.name)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], platform=meta.get("platform", ""), versions=[DEFAULT_VERSION],
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]])

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        try:
            model = resolve_for_config(self._data_plane.model_registry, request.name, request.version)
        except V2Error as err:
            raise grpc_error(err) from err
        return model_config_proto(model_config(request.name, model))

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        raise grpc_exc.Unimplemented(f"RepositoryModelLoad: {NO_REPOSITORY}")

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        raise grpc_exc.Unimplemented(f"RepositoryModelUnload: {NO_REPOSITORY}")

    # -- inference ----------------------------------------------------------------------------------
    def _prepare(self, request: Any, allow_stream: bool) -> tuple[Any, Any, Any]:
        model = self._v2.resolve(request.model_name, request.model_version)
        decoded = decode_grpc_request(request)
        self._v2.check_outputs(decoded)
        return model, decoded, parse_request(decoded, allow_stream=allow_stream)

    @staticmethod
    def _response(request: Any, decoded: Any, piece: Piece, final: bool | None = None) -> Any:
        wanted = [o.name for o in decoded.outputs] if decoded.outputs is not None else None
        params = {FINAL: final} if final is not None else None
        return encode_grpc_response(pb, request.model_name, request.model_version or DEFAULT_VERSION,
                                    request.id, output_tensors(piece, wanted), params)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        try:
            model = self._v2.resolve(request.model_name, request.model_version)
            if model.is_embedding:
                tensors = await self._v2.embed(model, decode_grpc_request(request))
                return encode_grpc_response(pb, request.model_name, request.model_version or DEFAULT_VERSION,
                                            request.id, tensors, None)
        except V2Error as err:
            raise grpc_error(err) from err
        try:
            model, decoded, req = self._prepare(request, allow_stream=False)
            piece = await self._deadline.before_deadline(self._v2.infer(model, req))
        except V2Error as err:
            raise grpc_error(err) from err
        except DeadlinePassed:
            raise grpc_exc.Unavailable(SHUTDOWN_MESSAGE) from None
        except Exception as exc:  # KServe's interceptor would answer INTERNAL without an id to quote
            raise grpc_exc.Internal(internal_error_message(logger, exc, "infer request failed")) from exc
        return self._response(request, decoded, piece)

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
        queue: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        done = object()

        async def generate(request: Any) -> None:
            model, decoded, req = self._prepare(request, allow_stream=True)
            async with aclosing(self._v2.generate(model, req)) as pieces:
                async for piece in pieces:
                    queue.put_nowait(pb.ModelStreamInferResponse(
                        infer_response=self._response(request, decoded, piece, piece.final)))

        async def serve_one(request: Any) -> None:
            try:
                await self._deadline.before_deadline(generate(request))
            except V2Error as err:
                queue.put_nowait(self._error(request, err.message))
            except DeadlinePassed:  # its final response: the error, so the client knows it ended
                queue.put_nowait(self._error(request, SHUTDOWN_MESSAGE))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                queue.put_nowait(self._error(request, internal_error_message(logger, exc, "stream request failed")))

        async def read_requests() -> None:
            async for request in request_iterator:
                task = asyncio.create_task(serve_one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        async def finish() -> None:
            """``done`` once the client has sent all its requests and each is answered, or once the
            shutdown grace period ends (each request in flight then answers its error first)."""
            try:
                deadline = asyncio.ensure_future(self._deadline.wait())
                await asyncio.wait({reader, deadline}, return_when=asyncio.FIRST_COMPLETED)
                deadline.cancel()
                if not reader.done():
                    reader.cancel()  # shutting down: take no more requests
                while tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                queue.put_nowait(done)

        reader = asyncio.create_task(read_requests())
        finisher = asyncio.create_task(finish())
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                yield item
            if not reader.cancelled():
                await reader
        finally:  # the client went away (or the server stops): abort what is still running
            for task in (reader, finisher, *tasks):
                task.cancel()
            await asyncio.gather(reader, finisher, *list(tasks), return_exceptions=True)

    @staticmethod
    def _error(request: Any, message: str) -> Any:
        resp = pb.ModelInferResponse(model_name=request.model_name,
                                     model_version=request.model_version or DEFAULT_VERSION, id=request.id)
        resp.parameters[FINAL].bool_param = True
        return pb.ModelStreamInferResponse(error_message=message, infer_response=resp)


def add_v2_servicer(server: Any, data_plane: Any, v2: V2DataPlane,
                    deadline: ShutdownDeadline | None = None) -> V2InferenceServicer:
    servicer = V2InferenceServicer(data_plane, v2, deadline)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return servicer
