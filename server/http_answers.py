"""Answers the HTTP protocol writes itself, before (or instead of) the app: OpenAI error JSON
with `connection: close`, as raw bytes or as a stand-in ASGI app."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send


def error_body(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": code}}).encode()


def raw_answer(status: int, reason: str, message: str, code: str) -> bytes:
    body = error_body(message, code)
    return (f"HTTP/1.1 {status} {reason}\r\n".encode()
            + b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body)


def head_message(limit: int) -> str:
    return f"the request line and headers are larger than {limit:,} bytes"


def raw_431(limit: int) -> bytes:
    return raw_answer(431, "Request Header Fields Too Large", head_message(limit),
                      "headers_too_large")


def refusal_431(limit: int) -> ASGIApp:
    async def refuse(_: Scope, __: Receive, send: Send) -> None:
        body = error_body(head_message(limit), "headers_too_large")
        await send({"type": "http.response.start", "status": 431, "headers": [
            (b"content-type", b"application/json"), (b"connection", b"close"),
            (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return refuse
