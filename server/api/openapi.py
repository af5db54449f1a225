"""The OpenAPI document (/openapi.json): what each route answers, errors included.

Routes declare their own responses with `responses(...)`. What the middlewares add to every
route (401 without a key, 431 for oversized headers, 503 while draining) is added here, and
FastAPI's 422 is removed: validation errors answer 400, as OpenAI's do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from server.api.protocol import ErrorResponse

_DESCRIPTIONS = {
    400: "Invalid request (OpenAI error JSON; `param` names the offending field)",
    401: "Missing or invalid API key",
    404: "No such resource",
    409: "Not in a state that allows this (e.g. cancelling a batch that has ended)",
    413: "Request body, image or upload over its size limit",
    429: "The request queue is full; retry after `Retry-After` seconds",
    431: "Request headers over their size limit",
    500: "The engine failed on this request; the server keeps serving",
    503: "Not ready (loading) or shutting down; retry after `Retry-After` seconds",
    504: "The request took longer than `request_timeout`",
    507: "Storage is full (the upload store, whose per-key quotas add up to more than it "
         "holds, or the server's disk); retry after `Retry-After` seconds",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying",
                                "schema": {"type": "string"}}}
SECURITY_SCHEME = "bearer"
# Models that only event streams refer to: FastAPI does not know them, _finish adds them.
_STREAMED: set[type[BaseModel]] = set()


def responses(ok: type[BaseModel] | None = None, *errors: int, ok_description: str = "OK",
              **extra: Any) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: its 200 model (JSON) and its OpenAI-error statuses."""
    out: dict[int | str, dict[str, Any]] = {}
    if ok is not None:
        out[200] = {"model": ok, "description": ok_description, **extra}
    for status in errors:
        out[status] = error_response_doc(status)
    return out


def event_stream(model: type[BaseModel]) -> dict[str, Any]:
    """`content` for a text/event-stream of `model` events, then `data: [DONE]`.

    Without OpenAPI 3.2's itemSchema, `schema` describes one event: {data, event, id},
    with `data` holding JSON (contentSchema), or the literal [DONE].
    """
    _STREAMED.add(model)
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{model.__name__}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    data = {"anyOf": [{"const": "[DONE]"},
                      {"type": "string", "contentMediaType": "application/json",
                       "contentSchema": payload}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {"text/event-stream": {"schema": event}}


def error_response_doc(status: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": ErrorResponse, "description": _DESCRIPTIONS[status]}
    if status in (429, 503):
        doc["headers"] = _RETRY_AFTER
    return doc


def install_openapi(app: FastAPI, is_protected: Callable[[str], bool], *, keys: bool) -> None:
    """Replace app.openapi with one that documents the middlewares' answers too."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description=app.description)
            _finish(schema, is_protected, keys=keys)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]


def _finish(schema: dict[str, Any], is_protected: Callable[[str], bool], *, keys: bool) -> None:
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for model in (ErrorResponse, *_STREAMED):  # referred to by name, maybe not yet defined
        _add_model(schemas, model)
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            answers = operation.setdefault("responses", {})
            answers.pop("422", None)  # validation errors are 400, declared by each route
            common = [431] + ([] if "503" in answers else [503])
            if keys and is_protected(path):
                common.append(401)
                operation["security"] = [{SECURITY_SCHEME: []}]
            elif keys:
                operation["security"] = []
            for status in common:
                doc: dict[str, Any] = {"description": _DESCRIPTIONS[status],
                                       "content": {"application/json": {"schema": error_ref}}}
                if status == 503:
                    doc["headers"] = _RETRY_AFTER
                answers.setdefault(str(status), doc)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    if keys:
        components["securitySchemes"] = {SECURITY_SCHEME: {"type": "http", "scheme": "bearer"}}


def _add_model(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in definition.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas.setdefault(model.__name__, definition)
