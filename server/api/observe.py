"""Each chat request's id (X-Request-ID in and out), its JSON log line and its metrics.

An ASGI middleware rather than code in the route, so that requests the route never sees
(invalid JSON, 503 while loading, 429 queue full) and streams cut by the client are
logged and counted exactly once, like the rest.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.logs import REQUEST_LOGGER
from server.metrics import Metrics
from server.timings import StageTimer

request_log = logging.getLogger(REQUEST_LOGGER)

MAX_REQUEST_ID_LENGTH = 128
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the answer"
_SCOPE_KEY = "vlserve.record"


@dataclass
class RequestRecord:
    """What one chat request's log line and metrics need; the route fills in its part."""

    request_id: str  # the client's X-Request-ID when valid, else the completion id
    completion_id: str  # chatcmpl-<hex>, the `id` of the completion
    client: str | None
    path: str
    timer: StageTimer | None = None
    stream: bool = False
    finish_reason: str | None = None
    status: int | None = None  # set by the route when the HTTP status cannot tell (mid-stream)


def client_request_id(value: str | None) -> str | None:
    """The client's X-Request-ID if usable (printable ASCII, at most 128 characters)."""
    if value is None:
        return None
    value = value.strip()
    if not 0 < len(value) <= MAX_REQUEST_ID_LENGTH:
        return None
    if not all(" " <= char <= "~" for char in value):
        return None
    return value


def request_record(request: Request) -> RequestRecord:
    """The record the middleware made for this request (a fresh one without middleware)."""
    record = request.scope.get(_SCOPE_KEY)
    if record is None:
        record = _new_record(request.scope)
        request.scope[_SCOPE_KEY] = record
    return record


def _new_record(scope: Scope) -> RequestRecord:
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    client_id = client_request_id(Headers(scope=scope).get("x-request-id"))
    client = scope.get("client")
    return RequestRecord(request_id=client_id or completion_id, completion_id=completion_id,
                         client=client[0] if client else None, path=scope.get("path", ""))


class RequestObserver:
    """Pure ASGI (no response buffering, so streams stay streams)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, model: str, paths: frozenset[str]
                 ) -> None:
        self.app = app
        self.metrics = metrics
        self.model = model
        self.paths = paths  # the chat routes; everything else passes through untouched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        record = _new_record(scope)
        scope[_SCOPE_KEY] = record
        status: int | None = None  # HTTP status, once the response has started
        completed = False  # the last body part went out
        failed_with: int | None = None

        async def send_and_watch(message: Message) -> None:
            nonlocal status, completed
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers.append("X-Request-ID", record.request_id)
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                completed = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except ClientDisconnect:
            failed_with = CLIENT_CLOSED
            raise
        except Exception:
            failed_with = 500
            raise
        finally:
            self._observe(record, _final_status(record, status, completed, failed_with))

    def _observe(self, record: RequestRecord, status: int) -> None:
        self.metrics.observe_request(status, record.finish_reason, record.timer)
        fields = log_fields(record, status, self.model)
        request_log.info("chat_completion %s %d", record.request_id, status,
                         extra={"json_fields": fields})


def _final_status(record: RequestRecord, status: int | None, completed: bool,
                  failed_with: int | None) -> int:
    if record.status is not None:
        return record.status
    if failed_with is not None and not completed:
        return failed_with
    if status is None:
        return CLIENT_CLOSED  # cancelled before any answer (server shutdown, disconnect)
    if not completed and record.finish_reason is None:
        return CLIENT_CLOSED  # a stream cut short
    return status


def log_fields(record: RequestRecord, status: int, model: str) -> dict[str, object]:
    """The request's JSON log line (timings as in the response's `timings` object)."""
    fields: dict[str, object] = {"event": "chat_completion", "request_id": record.request_id}
    if record.completion_id != record.request_id:
        fields["completion_id"] = record.completion_id
    fields.update(model=model, status=status, finish_reason=record.finish_reason,
                  stream=record.stream, client=record.client, path=record.path)
    timer = record.timer
    if timer is not None:
        fields.update(timings=timer.as_dict(), images=timer.images,
                      image_cache_hits=timer.image_cache_hits)
    return fields
