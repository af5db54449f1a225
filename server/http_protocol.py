"""A bound on request headers, where they are parsed: uvicorn's HTTP protocol.

httptools (llhttp) accepts headers of any size, so without a bound a client can make the
server buffer gigabytes before any application code runs, and an ASGI middleware would see
them only once they are all in memory. The httptools protocol is subclassed: while a
request's head (request line and headers) is incomplete, the bytes received count against
`max_header_bytes`; a head that completes within one read is measured as parsed. Over the
limit it answers 431 (OpenAI error JSON) and closes the connection; the application never
sees the request. Without httptools, uvicorn's h11 protocol gets the same bound
(h11_max_incomplete_event_size; h11 answers a plain-text 400).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def protocol_options(max_header_bytes: int) -> dict[str, Any]:
    """uvicorn.Config keyword arguments that bound request headers to `max_header_bytes`."""
    try:
        import httptools  # noqa: F401  (uvicorn[standard] brings it)
    except ImportError:
        return {"http": "h11", "h11_max_incomplete_event_size": max_header_bytes}
    bounded = type("BoundedHttpToolsProtocol", (BoundedHeadersProtocol,),
                   {"max_header_bytes": max_header_bytes})
    return {"http": bounded}


class BoundedHeadersProtocol(HttpToolsProtocol):
    max_header_bytes = 16 * 1024  # request line and headers, in bytes; set by protocol_options

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # reading a request line and headers (not a body)
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():  # refused: the rest is not worth parsing
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # After parsing: a head still incomplete means all of these bytes are head bytes.
        if self._in_head and self._head_bytes > self.max_header_bytes \
                and not self.transport.is_closing():
            self.logger.warning("request head over %d bytes: answered 431",
                                self.max_header_bytes)
            self.transport.write(_raw_431(self.max_header_bytes))
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        # A head that arrived whole in one read is measured as parsed. It is answered by a
        # stand-in app, so that uvicorn keeps the order of pipelined responses.
        size = len(self.url) + 16 + sum(len(name) + len(value) + 4
                                        for name, value in self.headers)
        if size <= self.max_header_bytes:
            super().on_headers_complete()
            return
        self.logger.warning("request head over %d bytes: answered 431", self.max_header_bytes)
        app, self.app = self.app, _refusal(self.max_header_bytes)  # type: ignore[assignment]
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True


def _error_body(limit: int) -> bytes:
    return json.dumps({"error": {
        "message": f"the request line and headers are larger than {limit:,} bytes",
        "type": "invalid_request_error", "param": None, "code": "headers_too_large"}}).encode()


def _raw_431(limit: int) -> bytes:
    body = _error_body(limit)
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body)


def _refusal(limit: int) -> ASGIApp:
    async def refuse(_: Scope, __: Receive, send: Send) -> None:
        body = _error_body(limit)
        await send({"type": "http.response.start", "status": 431, "headers": [
            (b"content-type", b"application/json"), (b"connection", b"close"),
            (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return refuse
