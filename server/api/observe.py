"""Each chat request's id (X-Request-ID in and out), its JSON log line and its metrics.

An ASGI middleware rather than code in the route, so that requests the route never sees
(invalid JSON, 503 while loading, 429 queue full) and streams cut by the client are
logged and counted exactly once, like the rest.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.auth import client_identity
from server.api.paths import route_spelling
from server.http_protocol import CONNECTION_KEY, ConnectionState
from server.logs import REQUEST_LOGGER
from server.metrics import Metrics
from server.timings import StageTimer

request_log = logging.getLogger(REQUEST_LOGGER)

MAX_REQUEST_ID_LENGTH = 128
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the answer"
REQUEST_TIMEOUT = 408
_SCOPE_KEY = "vlserve.record"


@dataclass
class RequestRecord:
    """What one chat request's log line and metrics need; the route fills in its part."""

    request_id: str  # the client's X-Request-ID when valid, else the completion id
    completion_id: str  # chatcmpl-<hex>, the `id` of the completion
    client: str | None
    path: str
    key: str | None = None  # which API key: the first 12 hex digits of its sha256
    timer: StageTimer | None = None
    stream: bool = False
    finish_reason: str | None = None
    status: int | None = None  # set by the route when the HTTP status cannot tell (mid-stream)
    # A background response: the request only queued it; its run is counted and logged
    # when it ends (observe_detached), not with the request.
    detached: bool = False


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


def new_completion_id() -> str:
    """`chatcmpl-` and 32 hex digits: the creation time in nanoseconds, then 64 random
    bits. Ids sort as they were made, so a listing's cursor (`after`) keeps its place even
    once the completion it names is gone (server.api.stored_chat)."""
    return f"chatcmpl-{time.time_ns():016x}{secrets.token_hex(8)}"


def request_record(request: Request) -> RequestRecord:
    """The record the middleware made for this request (a fresh one without middleware)."""
    record = request.scope.get(_SCOPE_KEY)
    if record is None:
        record = _new_record(request.scope)
        request.scope[_SCOPE_KEY] = record
    return record


def _new_record(scope: Scope) -> RequestRecord:
    completion_id = new_completion_id()
    client_id = client_request_id(Headers(scope=scope).get("x-request-id"))
    client = scope.get("client")
    return RequestRecord(request_id=client_id or completion_id, completion_id=completion_id,
                         client=client[0] if client else None, path=scope.get("path", ""),
                         key=client_identity(scope)[:12] or None)


class RequestObserver:
    """Pure ASGI (no response buffering, so streams stay streams)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, model: str, paths: frozenset[str],
                 write_timeout: float = 30.0) -> None:
        self.app = app
        self.metrics = metrics
        self.model = model
        self.paths = paths  # the chat routes; everything else passes through untouched
        self.write_timeout = write_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Not GET/HEAD: GET /chat/completions lists stored ones, no generation to count
        # (any other method is a chat request refused, a 405, logged and counted as such).
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD") \
                or route_spelling(scope["path"]) not in self.paths:
            await self.app(scope, receive, send)
            return
        record = _new_record(scope)
        scope[_SCOPE_KEY] = record
        connection: ConnectionState | None = scope.get(CONNECTION_KEY)
        status: int | None = None  # HTTP status, once the response has started
        sent_final = False  # the last body part was handed to the server
        dropped = False  # ... to a connection already gone (uvicorn drops it without a word)
        hung_up = False  # the client left before the last body part was sent
        failed_with: int | None = None

        async def receive_and_watch() -> Message:
            nonlocal hung_up
            message = await receive()
            # After the last part, uvicorn answers every receive with a disconnect.
            hung_up = hung_up or (message["type"] == "http.disconnect" and not sent_final)
            return message

        async def send_and_watch(message: Message) -> None:
            nonlocal status, sent_final, dropped
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers.append("X-Request-ID", record.request_id)
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                sent_final = True
                dropped = connection is not None and connection.gone

        try:
            await self.app(scope, receive_and_watch, send_and_watch)
        except ClientDisconnect:
            failed_with = CLIENT_CLOSED
            raise
        except Exception:
            failed_with = 500
            raise
        finally:
            completed = sent_final and not dropped and not hung_up
            if completed and connection is not None:
                # Only an answer that left the server counts: a reader that stalls before
                # the end gets `write_timeout` to take the rest.
                completed = await connection.delivered(self.write_timeout)
            timed_out = connection is not None and connection.timed_out
            final = _final_status(record, status, completed, failed_with, timed_out)
            if final in (CLIENT_CLOSED, REQUEST_TIMEOUT):
                record.finish_reason = None  # whatever the engine got to, nobody saw it
            self._observe(record, final)

    def _observe(self, record: RequestRecord, status: int) -> None:
        if not record.detached:
            self.metrics.observe_request(status, record.finish_reason, record.timer)
        fields = log_fields(record, status, self.model)
        if record.detached:  # what the request did: queue it (the run's line comes later)
            fields.update(event="background_queued", finish_reason=None)
            fields.pop("timings", None)
        request_log.info("%s %s %d", fields["event"], record.request_id, status,
                         extra={"json_fields": fields})


def observe_detached(metrics: Metrics, model: str, record: RequestRecord) -> None:
    """A background response's end: counted as the request it came from would have been
    (its status: 200, or how it failed; 499 when cancelled), logged with its timings."""
    status = record.status if record.status is not None else 200
    metrics.observe_request(status, record.finish_reason, record.timer)
    fields = log_fields(record, status, model)
    fields["event"] = "background_response"
    request_log.info("background_response %s %d", record.request_id, status,
                     extra={"json_fields": fields})


def _final_status(record: RequestRecord, status: int | None, completed: bool,
                  failed_with: int | None, timed_out: bool) -> int:
    """What the log and metrics say: a request whose answer did not reach the client is a
    499 (a hang-up at any stage, a stream cut short), or a 408 when the server closed the
    connection on a client too slow to send; never the status it would have had."""
    if completed:
        assert status is not None
        return record.status if record.status is not None else status
    if timed_out:
        return REQUEST_TIMEOUT
    if failed_with is not None:
        return failed_with
    return CLIENT_CLOSED


def log_fields(record: RequestRecord, status: int, model: str) -> dict[str, object]:
    """The request's JSON log line (timings as in the response's `timings` object)."""
    fields: dict[str, object] = {"event": "chat_completion", "request_id": record.request_id}
    if record.completion_id != record.request_id:
        fields["completion_id"] = record.completion_id
    fields.update(model=model, status=status, finish_reason=record.finish_reason,
                  stream=record.stream, client=record.client, key=record.key,
                  path=record.path)
    timer = record.timer
    if timer is not None:
        fields.update(timings=timer.as_dict(), images=timer.images,
                      image_cache_hits=timer.image_cache_hits)
    return fields
