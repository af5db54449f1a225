"""Answers spliced from JSON encoded once, when it was stored: a stored chat completion and
the pages of them or of its messages (server.api.stored_chat).

Encoding a page of Python objects (or decoding stored JSON back into them) holds the GIL
for its whole length: ~250 ms for 50 MB of data-URL images, ~50 ms per MB of logprobs,
every other stream standing still meanwhile, in a worker thread or not. Splicing bytes costs
a copy at most, and JSONPartsResponse sends them in slices, giving way to the other streams
between them, so what a page costs the event loop at one time does not grow with its size.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping, Sequence

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

Buffer = bytes | memoryview  # memoryview: a slice of a stored record, not copied out
Parts = list[Buffer]  # one JSON value, in pieces

SLICE_BYTES = 1 << 20  # a copy of this size takes ~0.1 ms: the most one send holds the loop


def encoded(value: object) -> bytes:
    """`value` as JSONResponse renders it (compact, UTF-8): what is stored and spliced."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800" in a request): escaped
        return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()


def with_member(obj: Buffer, name: str, value: object) -> Parts:
    """The encoded object `obj` (not empty, without `name`) with `"name": value` last."""
    return [memoryview(obj)[:-1], b"," + encoded(name) + b":" + encoded(value) + b"}"]


def list_parts(page: Sequence[tuple[str, Parts]], *, has_more: bool) -> Parts:
    """OpenAI's list object around one page of (id, encoded object), as
    server.api.item_pages.list_page has it."""
    out: Parts = [b'{"object":"list","data":[']
    for index, (_, parts) in enumerate(page):
        if index:
            out.append(b",")
        out.extend(parts)
    first, last = (page[0][0], page[-1][0]) if page else (None, None)
    out.append(b'],"first_id":' + encoded(first) + b',"last_id":' + encoded(last)
               + b',"has_more":' + (b"true" if has_more else b"false") + b"}")
    return out


def lines(body: bytes) -> list[memoryview]:
    """The newline-separated JSON values of `body` (compact JSON holds no raw newline), as
    views into it: a record's items are read back without a copy or a parse."""
    out: list[memoryview] = []
    view, start = memoryview(body), 0
    while start <= len(body):
        end = body.find(b"\n", start)
        end = len(body) if end < 0 else end
        out.append(view[start:end])
        start = end + 1
    return out


def slices(parts: Parts, size: int = SLICE_BYTES) -> Iterator[bytes]:
    """`parts` cut and joined into pieces of `size` bytes (the last one shorter): large
    parts are not copied whole at once, small ones do not go one write each."""
    pending: Parts = []
    held = 0
    for part in parts:
        view = memoryview(part)
        while len(view):
            take = view[:size - held]
            pending.append(take)
            held += len(take)
            view = view[len(take):]
            if held == size:
                yield b"".join(pending)
                pending, held = [], 0
    if pending:
        yield b"".join(pending)


class JSONPartsResponse(Response):
    """A JSON answer made of `parts`, sent in slices of at most SLICE_BYTES with its
    Content-Length known up front; between slices the event loop serves the others."""

    media_type = "application/json"

    def __init__(self, parts: Parts, status_code: int = 200,
                 headers: Mapping[str, str] | None = None) -> None:
        self.status_code = status_code
        self.background = None
        self.parts = parts
        length = sum(len(part) for part in parts)
        self.init_headers({**(headers or {}), "content-length": str(length)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        for piece in slices(self.parts):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            await asyncio.sleep(0)  # a socket that takes it all never makes send wait
        await send({"type": "http.response.body", "body": b"", "more_body": False})
