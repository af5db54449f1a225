"""What the soak clients send: a mix of request kinds, built before the clock starts.

Good kinds (text, inline image, upload → chat → delete, stream, abandoned stream) expect
200, or 429 with Retry-After when the queue is full. Bad kinds each expect one 4xx. Images
come from a fixed pool, so after warm-up the server's caches are full and steady: RSS
growth then means a leak, not a cache filling up.
"""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass, field

from server.bench.payloads import synthetic_photo

GOOD_KINDS = ("text", "image", "upload", "stream", "abandon")
# Relative frequencies; bad requests are about one in seven.
WEIGHTS = {"text": 25, "image": 15, "upload": 10, "stream": 20, "abandon": 10, "bad": 15}


@dataclass(frozen=True)
class BadRequest:
    """A request that must be refused, and the status that refuses it."""

    name: str
    method: str
    path: str  # under the API base (/api/v1)
    expect: int
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    with_key: bool = True  # False: sent without the API key (only when one is configured)


@dataclass(frozen=True)
class Image:
    data: bytes
    mime: str

    @property
    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


def image_pool(size: int, seed: int = 0) -> list[Image]:
    """`size` distinct photo-like pictures, 96 to 320 px, alternately JPEG and PNG."""
    rng = random.Random(seed)
    pool = []
    for index in range(size):
        picture = synthetic_photo(rng.randint(96, 320), rng.randint(96, 320), seed=seed + index)
        fmt, mime = ("JPEG", "image/jpeg") if index % 2 == 0 else ("PNG", "image/png")
        buf = io.BytesIO()
        picture.save(buf, fmt)
        pool.append(Image(buf.getvalue(), mime))
    return pool


def chat_body(text: str, max_tokens: int, *, image_url: str | None = None,
              file_id: str | None = None, stream: bool = False) -> bytes:
    content: str | list[dict[str, object]] = text
    if image_url is not None or file_id is not None:
        part: dict[str, object] = (
            {"type": "image_url", "image_url": {"url": image_url}} if image_url is not None
            else {"type": "file", "file": {"file_id": file_id}})
        content = [{"type": "text", "text": text}, part]
    body: dict[str, object] = {"messages": [{"role": "user", "content": content}],
                               "max_tokens": max_tokens, "temperature": 0.7, "top_p": 0.9}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def bad_requests(with_key: bool) -> list[BadRequest]:
    """Each kind of mistake clients make, with the answer it must get."""
    json_type = {"content-type": "application/json"}

    def chat(name: str, body: object, expect: int = 400) -> BadRequest:
        return BadRequest(name, "POST", "/chat/completions", expect,
                          json.dumps(body).encode(), json_type)

    hi = [{"role": "user", "content": "hi"}]
    deep: object = "x"
    for _ in range(80):
        deep = [deep]
    bad = [
        BadRequest("invalid JSON", "POST", "/chat/completions", 400, b'{"messages": [',
                   json_type),
        chat("no messages", {"max_tokens": 4}),
        chat("max_tokens 0", {"messages": hi, "max_tokens": 0}),
        chat("wrong type", {"messages": hi, "stream": "yes"}),
        chat("five stop strings", {"messages": hi, "stop": list("abcde")}),
        chat("not base64", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}),
        chat("not an image", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}),
        chat("remote URL", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}]}]}),
        chat("unknown file", {"messages": [{"role": "user", "content": [
            {"type": "file", "file": {"file_id": "file-0123456789abcdef0123456789abcdef"}}]}]}),
        chat("too deep", {"messages": hi, "extra": deep}),
        BadRequest("unknown file GET", "GET", "/files/file-nope", 404),
        BadRequest("unknown model", "GET", "/models/no-such-model", 404),
        BadRequest("wrong method", "PUT", "/chat/completions", 405),
        BadRequest("upload not an image", "POST", "/files", 400,
                   b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\""
                   b"\r\n\r\nnot an image\r\n--b--\r\n",
                   {"content-type": "multipart/form-data; boundary=b"}),
    ]
    if with_key:
        bad.append(BadRequest("no API key", "GET", "/models", 401, with_key=False))
    return bad


def pick_kind(rng: random.Random) -> str:
    kinds = list(WEIGHTS)
    return rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds])[0]
