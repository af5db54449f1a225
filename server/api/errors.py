"""Every failure leaves as OpenAI error JSON: {"error": {message, type, param, code}}."""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.routes import RouteInfo, allowed_methods, route_table
from server.engine.engine import EngineNotReadyError
from server.store import StateUnavailable

logger = logging.getLogger("vlserve.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_response(status: int, message: str, *, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    routes: list[RouteInfo] = []  # built on the first 405, once every route exists

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code,
                              headers=exc.headers)

    @app.exception_handler(StateUnavailable)
    async def _state_down(_: Request, exc: StateUnavailable) -> JSONResponse:
        # The shared store (state_url) is out of reach: the replica itself is fine, so a
        # retry soon (or on another replica, once Redis is back) can succeed.
        logger.error("state store unavailable: %s", exc)
        return error_response(503, "the shared state store (uploads, stored responses, "
                              "batches) is unavailable; try again shortly",
                              code="state_store_unavailable", headers={"Retry-After": "2"})

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [(_field_path(e.get("loc", ()), exc.body), e) for e in exc.errors()]
        # The deepest error names the field: a value under a union gets one error per
        # branch, and the first is often the shallow one ("content: Input should be a valid
        # string" for a bad image part); at equal depth, one that is not a branch's type
        # mismatch ("input: at most 2048 items", not "input: a valid string").
        loc, first = max(errors, key=lambda pair: (
            len(pair[0]), not str(pair[1].get("type", "")).endswith("_type")), default=(
            [], {"msg": "invalid request"}))
        param = ".".join(loc) or None
        message = str(first.get("msg", "invalid request"))
        if param:
            message = f"{param}: {message}"
        elif first.get("type") == "missing":
            message = "the request body is missing or empty"
        others = {".".join(path) for path, _ in errors} - {param or ""}
        if others:
            message += f" (and {len(others)} more problem(s))"
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route that matched the path; a path served by
            # several routes (GET and POST /files) must list all of their methods.
            routes[:] = routes or route_table(request.app.routes)
            headers["Allow"] = ", ".join(allowed_methods(routes, request.url.path))
        return error_response(exc.status_code, str(exc.detail), code=getattr(exc, "code", None),
                              headers=headers or None)

    @app.exception_handler(EngineNotReadyError)
    async def _not_ready(_: Request, exc: EngineNotReadyError) -> JSONResponse:
        return error_response(503, str(exc), code="model_not_ready",
                              headers={"Retry-After": "5"})

    # OSError's own handler (Exception's runs in Starlette's outermost middleware, which
    # re-raises after answering: the request log would say 500 with a traceback).
    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        if exc.errno in _STORAGE_FULL:
            # The operator's problem, not the request's: one line that says what to do,
            # and an answer the client can retry later (nothing half-written is kept).
            logger.error("%s %s: the disk is full (%s); free space, or shorten "
                         "batch_file_ttl_s / batch_retention_s", request.method,
                         request.url.path, exc)
            return error_response(507, "the server's storage is full; try again later",
                                  code="insufficient_storage", headers={"Retry-After": "60"})
        return await _unexpected(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")


_STORAGE_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})

# How pydantic names the branch of a union in an error's location ("str",
# "list[union[TextPart,ImagePart]]", "function-after[...]"): not a field of the request.
_BRANCH_NAMES = frozenset({"str", "int", "float", "bool", "none", "dict", "list", "bytes"})


def _branch(part: object) -> bool:
    return isinstance(part, str) and (part in _BRANCH_NAMES or "[" in part)


def _field_path(loc: Sequence[object], body: object) -> list[str]:
    """An error's location as the request spells it: the keys and indexes found in the
    body, without pydantic's union labels and discriminator tags (`image_url` in
    `content.1.image_url.image_url.detail`); a last part not in the body (a missing
    field) stays, unless it is a branch label."""
    if not loc or loc[0] != "body":  # a query or path parameter: named as it is
        return [str(part) for part in loc if not _branch(part)]
    parts = list(loc[1:])
    out: list[str] = []
    node = body
    for i, part in enumerate(parts):
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif i < len(parts) - 1 or _branch(part):
            continue  # a union's label or a tag: not in the body, not the request's
        out.append(str(part))
    return out
