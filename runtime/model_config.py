"""Triton's model configuration call: ``GET /v2/models/{m}[/versions/{v}]/config`` and gRPC
``ModelConfig``.

Not part of KServe's v2 protocol, but tritonclient's ``get_model_config`` and the tools built on
it (perf_analyzer, model_analyzer, genai-perf) read it before they send anything: the inputs'
types and shapes, ``max_batch_size`` (0: shapes carry no batch dimension) and whether the model
is *decoupled* (answers a request with any number of responses, as our ``stream`` input does;
perf_analyzer then uses ModelStreamInfer). ``model_config`` builds the configuration once, in
the JSON form Triton's HTTP endpoint answers (protobuf field names); gRPC parses the same
dictionary into ``ModelConfigResponse``, so the two cannot drift apart.

The model needs no engine for it (Triton answers it for a model that is still loading too),
except that an embedding model's output width is -1 (variable) until its engine is loaded.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from google.protobuf import json_format

from runtime import v2_grpc_predict_pb2 as pb
from runtime.v2_codec import V2Error
from runtime.v2_dataplane import MODEL_VERSION

# KServe v2 datatype -> Triton's model-config DataType.
_TRITON_TYPES = {"BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
                 "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
                 "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64",
                 "BYTES": "TYPE_STRING", "BF16": "TYPE_BF16"}
REQUIRED_INPUTS = {"text_input"}


def model_config(name: str, model: Any) -> dict[str, Any]:
    """Triton's ``ModelConfig`` of ``model`` (a ``VLMModel``) as served under ``name``, in the
    JSON form of Triton's HTTP API."""
    inputs = [{"name": t["name"], "data_type": _TRITON_TYPES[t["datatype"]], "format": "FORMAT_NONE",
               "dims": list(t["shape"]), "optional": t["name"] not in REQUIRED_INPUTS}
              for t in model.get_input_types()]
    outputs = [{"name": t["name"], "data_type": _TRITON_TYPES[t["datatype"]], "dims": list(t["shape"])}
               for t in model.get_output_types()]
    return {
        "name": name,
        "platform": "",
        "backend": "vlmserve",
        "runtime": "",
        "max_batch_size": 0,  # the engine batches internally (continuous batching), as Triton's vLLM backend
        "input": inputs,
        "output": outputs,
        # The engine owns its devices: Triton's KIND_MODEL, one instance.
        "instance_group": [{"name": name, "kind": "KIND_MODEL", "count": 1}],
        "parameters": {},
        "model_transaction_policy": {"decoupled": not model.is_embedding},
    }


def model_config_proto(config: dict[str, Any]) -> Any:
    """The gRPC ``ModelConfigResponse`` for ``model_config``'s dictionary."""
    return json_format.ParseDict({"config": config}, pb.ModelConfigResponse())


def resolve_for_config(registry: Any, name: str, version: str | None) -> Any:
    """The registered model ``name`` (loaded or not); V2Error 404 for an unknown name or version."""
    model = registry.get_model(name)
    if model is None or not hasattr(model, "get_input_types"):
        raise V2Error(f"Model with name {name} does not exist.", 404)
    if version not in (None, "", MODEL_VERSION):
        raise V2Error(f"Model {name} has no version {version!r}; it serves version {MODEL_VERSION} only.", 404)
    return model


def register_model_config_routes(app: FastAPI, registry: Any) -> None:
    """``GET /v2/models/{m}/config`` and ``.../versions/{v}/config``; call before KServe's routes
    (its ``/v2/models/{m}`` family would otherwise answer 404 for them)."""

    async def config(model_name: str, model_version: str | None = None) -> JSONResponse:
        try:
            model = resolve_for_config(registry, model_name, model_version)
        except V2Error as err:
            return JSONResponse(status_code=err.status, content={"error": err.message})
        return JSONResponse(model_config(model_name, model))

    app.add_api_route("/v2/models/{model_name}/config", config, methods=["GET"], include_in_schema=True)
    app.add_api_route("/v2/models/{model_name}/versions/{model_version}/config", config, methods=["GET"],
                      include_in_schema=False)
