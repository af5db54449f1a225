"""Request body limits, before any route reads a byte: size (413) and JSON nesting (400).

A pure-ASGI middleware. JSON bodies (what FastAPI would parse as JSON: no content type,
application/json, */*+json) are read here, up to the limit, checked for nesting depth and
handed on; other bodies (multipart uploads) stream through a counter. Request headers are
bounded lower down, in the HTTP protocol (server/http_protocol.py), where they are parsed.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response
from server.api.json_depth import json_shape
from server.api.protocol import MAX_CONTENT_PARTS, MAX_MESSAGES

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Arrays and objects in one JSON body: a chat at the protocol's limits has fewer (a message
# and its content list, a part and its image_url); parsing 200,000 of them held the event
# loop (and every stream) for a quarter of a second before any validation could refuse them.
MAX_JSON_CONTAINERS = 2 * MAX_MESSAGES + 2 * MAX_CONTENT_PARTS + 64
_SCAN_OFF_LOOP_BYTES = 1 << 20


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a streamed body passes the limit; the error handler turns
    it into the 413 (routes re-raise HTTPExceptions from body reading as they are)."""

    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large_message(limit), headers={"Connection": "close"})


class _Disconnected(Exception):
    """The client left before its body was in."""


class RequestLimits:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_json_depth: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(scope, receive, send)  # refused without reading it
            return
        if not _is_json(headers.get("content-type")):
            await self.app(scope, self._counting(receive), send)
            return
        try:
            body = await self._read(receive)
        except _Disconnected:
            return  # nobody to answer (logged as 499 by the request observer)
        if body is None:
            await self._too_large(scope, receive, send)
            return
        # numpy's passes let go of the interpreter: off the loop, a large body's scan leaves
        # token streams running.
        if len(body) > _SCAN_OFF_LOOP_BYTES:
            depth, containers = await asyncio.to_thread(json_shape, body, MAX_JSON_CONTAINERS)
        else:
            depth, containers = json_shape(body, MAX_JSON_CONTAINERS)
        if depth > self.max_json_depth:
            response = error_response(
                400, f"the JSON body nests {depth} levels deep; the limit is "
                f"{self.max_json_depth}", code="json_too_deep")
            await response(scope, receive, send)
            return
        if containers > MAX_JSON_CONTAINERS:
            response = error_response(
                400, f"the JSON body holds more than {MAX_JSON_CONTAINERS:,} arrays and "
                "objects", code="json_too_large")
            await response(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes the limit (the rest is never read)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _counting(self, receive: Receive) -> Receive:
        size = 0

        async def counted() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        return counted

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, _too_large_message(self.max_body_bytes),
                                  code="request_too_large", headers={"Connection": "close"})
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the already-read body once, then the real one (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _is_json(content_type: str | None) -> bool:
    """What FastAPI parses as JSON: no content type at all, application/json or +json."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))


def _too_large_message(limit: int) -> str:
    return f"the request body is larger than {limit:,} bytes"
