"""Request bodies in the served OpenAPI schema (``/openapi.json``).

Our POST routes read and validate their JSON bodies themselves (so that every error keeps the
route's own shape: OpenAI's, or KServe's ``{"error": ...}``, never FastAPI's 422), so FastAPI
cannot see what they take and published them without a request body: clients and fuzzers
generated from the schema could not call them. ``request_body(Model)`` gives a route's
``openapi_extra`` naming the pydantic model; ``publish_request_schemas(app)`` adds the models'
JSON schemas under ``components/schemas``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

logger = logging.getLogger("vlmserve.openapi")
REF = "#/components/schemas/{model}"
_MODELS: dict[str, type[BaseModel]] = {}  # component name -> model, for every request_body() given


def _name(model: type[BaseModel]) -> str:
    return model.__name__  # pydantic names its $defs entries so (request model names are unique)


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is ``model``."""
    _MODELS[_name(model)] = model
    schema = {"$ref": REF.format(model=_name(model))}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def publish_request_schemas(app: FastAPI) -> None:
    """Make ``app.openapi()`` carry the schemas the ``request_body`` references point at."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in _definitions().items():
            if name in components and components[name] != definition:
                logger.warning("OpenAPI schema %s is defined twice; keeping the first", name)
                continue
            components[name] = definition
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _definitions() -> dict[str, Any]:
    models = [(model, "validation") for model in _MODELS.values()]
    _, top = models_json_schema(models, ref_template=REF)  # type: ignore[arg-type]
    return top.get("$defs", {})
