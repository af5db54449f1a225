"""One batch line as an in-process request through the app itself.

Going through the whole ASGI app (not a shortcut into the chat handler) means a batch line
is validated, resolved, logged and counted exactly like the same request over HTTP, and
its answer is the very body a client would have received.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message

from server.api.auth import set_identity
from server.api.internal import BATCH_IMAGES, INTERNAL_KEY, PRIORITY_KEY
from server.uploads import StoredFile

logger = logging.getLogger("vlserve.batches")


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any  # the parsed JSON answer (an OpenAI error object for a non-2xx)
    request_id: str


async def call(app: ASGIApp, path: str, body: dict[str, Any], *, owner: str, priority: int,
               request_id: str, cancel: asyncio.Event,
               images: Mapping[str, StoredFile] | None = None) -> Answer:
    """POST `body` to `path` as `owner`; setting `cancel` hangs up, as a client can.
    `images`: the uploads the batch keeps, which its file ids resolve to."""
    payload = json.dumps(body).encode()
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "client": ("batch", 0),
        "server": ("vlserve", 0), "state": {},
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"x-request-id", request_id.encode())],
        INTERNAL_KEY: True, PRIORITY_KEY: priority,
    }
    set_identity(scope, owner)
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await cancel.wait()  # after the body, the only message left is the hang-up
        return {"type": "http.disconnect"}

    status = 500
    chunks: list[bytes] = []

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    token = BATCH_IMAGES.set(images)  # seen by this call only (each line is its own task)
    try:
        await app(scope, receive, send)
    except Exception:
        # Starlette re-raises after sending its 500: the line has its answer (a retry
        # would most likely fail the same way, for ever).
        logger.exception("batch line %s failed in the server", request_id)
        if not chunks:
            status, chunks = 500, [json.dumps({"error": {
                "message": "the server failed on this request", "type": "server_error",
                "param": None, "code": None}}).encode()]
    finally:
        BATCH_IMAGES.reset(token)
    raw = b"".join(chunks)
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = {"error": {"message": raw.decode("utf-8", "replace")[:500],
                            "type": "server_error", "param": None, "code": None}}
    return Answer(status, parsed, request_id)
