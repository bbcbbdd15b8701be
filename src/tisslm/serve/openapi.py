"""The parts of the OpenAPI document FastAPI cannot infer: request bodies the routes read themselves, SSE streams.

The routes read their JSON bodies themselves (see `routes.json_body`), so that every bad body gets
an OpenAI-style error rather than FastAPI's 422; FastAPI then sees no body parameter to document.
And a route that streams when the body says `stream` returns a StreamingResponse, whose events
FastAPI knows nothing of. The helpers here write those parts of an operation, referring to the
models by name, and `add_components` has the app's document carry the schemas so referred to.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from tisslm.serve.schemas import ErrorResponse

REF = "#/components/schemas/"

# Models the helpers referred to, by component name: filled as the routes are declared, at import.
_REFERRED: dict[str, tuple[type[BaseModel], JsonSchemaMode]] = {}

ERRORS = {
    400: "The body is not valid UTF-8 or JSON, does not validate, or asks past the server's limits",
    404: "`model` names another model than the one served",
    413: "The body is larger than the server's max_body_bytes",
    429: "The queue is full: retry later",
    500: "The generation failed",
    503: "The server is shutting down",
    504: "The request outlived the server's timeout before it finished generating",
}


def component(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, str]:
    """A reference to `model`'s schema (as a request body: validation, as a response: serialization)."""
    if _REFERRED.setdefault(model.__name__, (model, mode)) != (model, mode):
        raise ValueError(f"{model.__name__}: another model, or the same in another mode, has that name")
    return {"$ref": REF + model.__name__}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The `openapi_extra` of a route whose JSON body is `model`."""
    content = {"application/json": {"schema": component(model, "validation")}}
    return {"requestBody": {"required": True, "content": content}}


def event_stream(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The `responses` entry of a route that answers with server-sent events when `stream` is true."""
    event = {"anyOf": [component(chunk, "serialization"), component(ErrorResponse, "serialization")]}
    description = (
        "The answer as one JSON body; with `stream` true, as server-sent events instead: each `data:` line"
        f" one {chunk.__name__}, or an ErrorResponse if the generation fails mid-way, then `data: [DONE]`."
    )
    return {200: {"content": {"text/event-stream": {"schema": event}}, "description": description}}


def errors(*statuses: int, described: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """The `responses` entries of the errors a route answers, each with the OpenAI-style error body;
    `described` gives a route's own meaning of a status, where it differs from ERRORS'."""
    descriptions = ERRORS | (described or {})
    return {status: {"model": ErrorResponse, "description": descriptions[status]} for status in statuses}


def add_components(app: FastAPI) -> None:
    """Have `app.openapi()` add the schemas of the models the helpers referred to, once, to its document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schemas = build().setdefault("components", {}).setdefault("schemas", {})
            _, found = models_json_schema(list(_REFERRED.values()), ref_template=REF + "{model}")
            for name, schema in found.get("$defs", {}).items():
                schemas.setdefault(name, schema)  # the models here are named by class, as FastAPI names its own
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


UNAUTHORIZED = "No `Authorization: Bearer KEY` header with one of the server's API keys (code `invalid_api_key`)"


def add_security(app: FastAPI) -> None:
    """Declare the bearer scheme of a server started with API keys: every /v1/ operation requires it
    and may answer 401; the others (/health, /metrics, the page) stay open."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            schemes = document.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["bearer"] = {"type": "http", "scheme": "bearer", "description": "One of the server's API keys"}
            for path, operations in document.get("paths", {}).items():
                if path.startswith("/v1/"):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
                        response = {
                            "description": UNAUTHORIZED,
                            "content": {"application/json": {"schema": component(ErrorResponse, "serialization")}},
                        }
                        operation.setdefault("responses", {}).setdefault("401", response)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
