"""Small builders shared by the tests."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from ci import IN_CI, skip_unless_ci  # noqa: F401  (re-exported for the tests)
from openai.types.responses import Response, ResponseStreamEvent
from PIL import Image
from pydantic import TypeAdapter

RESPONSE_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)



def photo_bytes(width: int = 320, height: int = 240, fmt: str = "PNG", seed: int = 0) -> bytes:
    """A small picture with structure (gradients and a block), not a flat colour."""
    image = Image.new("RGB", (width, height))
    pixels = [
        ((x * 255) // max(1, width - 1), (y * 255) // max(1, height - 1), (x * y + seed) % 256)
        for y in range(height) for x in range(width)
    ]
    image.putdata(pixels)
    image.paste((255, 255, 255), (width // 4, height // 4, width // 2, height // 2))
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def pattern_png(width: int, height: int, seed: int = 0) -> bytes:
    """Like photo_bytes but built with numpy, so large sizes stay cheap."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                    (x * y + seed) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(text: str, url: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": url}}]}


# configs/default.yaml's image_max_side, which the test servers run with.
TEST_IMAGE_MAX_SIDE = 1024
# (longest side, image tokens) per image `detail` in the test servers: `auto` as above,
# `low` and `high` server/config.py's defaults (image_low_max_side/_tokens,
# image_high_max_side; None: the projector's own token limit).
TEST_DETAIL_CAPS: dict[str, tuple[int, int | None]] = {
    "auto": (TEST_IMAGE_MAX_SIDE, None), "low": (512, 64), "high": (2048, None)}


def expected_image_tokens(family: str, width: int, height: int, detail: str = "auto") -> int:
    """The image tokens mtmd should produce for a width x height upload sent with `detail`,
    worked out from each projector's published rules (not from the server's own sizing code)."""
    if family == "llava":
        return (112 // 14) ** 2  # the tiny CLIP sees one 112 px square in 14 px patches
    side, budget = TEST_DETAIL_CAPS[detail]
    if family in ("glm4v", "qwen2vl"):
        return dynamic_image_tokens(width, height, side, budget or 4096)
    # youtuvl: the longest side capped at `side`, then every side rounded up to whole 32 px
    # squares (16 px patches merged 2x2), one token per square; over the budget, the largest
    # scale whose grid fits it (searched here in small steps of scale).
    scale = min(1.0, side / max(width, height))
    while True:
        tokens = math.ceil(width * scale / 32) * math.ceil(height * scale / 32)
        if budget is None or tokens <= budget:
            return tokens
        scale -= 1e-5


def dynamic_image_tokens(width: int, height: int, max_side: int = TEST_IMAGE_MAX_SIDE,
                         max_tokens: int = 4096) -> int:
    """GLM-4V's and Qwen2-VL's processors (Glm4vImageProcessor / Qwen2VLImageProcessor
    smart_resize, with llama.cpp's 8..4096 token range for glm4v and qwen2vl_merger, or a
    smaller maximum), after the longest side is capped at `max_side` in whole 28 px cells:
    each side rounded to the nearest 28 px (14 px patches merged 2x2), the image scaled down
    into the token maximum or up to 8; one token per 28 px square."""
    cell, low, high = 28, 8 * 28 * 28, max_tokens * 28 * 28
    cap = max_side // cell * cell
    scale = min(1.0, cap / max(width, height))
    width, height = round(width * scale), round(height * scale)
    w, h = max(cell, round(width / cell) * cell), max(cell, round(height / cell) * cell)
    if w * h > high:
        beta = math.sqrt(width * height / high)
        w = max(cell, math.floor(width / beta / cell) * cell)
        h = max(cell, math.floor(height / beta / cell) * cell)
    elif w * h < low:
        beta = math.sqrt(low / (width * height))
        w, h = math.ceil(width * beta / cell) * cell, math.ceil(height * beta / cell) * cell
    return (w // cell) * (h // cell)


class Stream:
    """One SSE chat stream read in a thread: its events, and how it ended."""

    def __init__(self, url: str, body: dict, headers: dict[str, str] | None = None) -> None:
        self.events: list[dict | str] = []
        self.error: Exception | None = None
        self.status: int | None = None
        self.started = threading.Event()
        self._hang_up = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, body, headers or {}),
                                        daemon=True)
        self._thread.start()

    def _run(self, url: str, body: dict, headers: dict[str, str]) -> None:
        try:
            with httpx.stream("POST", f"{url}/chat/completions", timeout=120, headers=headers,
                              json={**body, "stream": True}) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        data = line[6:]
                        self.events.append(data if data == "[DONE]" else json.loads(data))
                        if len(self.events) >= 2:
                            self.started.set()
                    if self._hang_up.is_set():
                        break  # leaving the block closes the connection mid-stream
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.started.set()

    def hang_up(self, timeout: float = 120) -> None:
        """Close the connection mid-stream, as a client that goes away does."""
        self._hang_up.set()
        self.join(timeout)

    def join(self, timeout: float = 120) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream hung"


def responses_create(server: Any, **body: object) -> Response:
    """POST /responses on a RunningServer; the raw JSON validated by the SDK's Response type
    (the SDK itself builds its objects without validating them)."""
    answer = httpx.post(f"{server.api}/responses", json={"model": "m", **body}, timeout=120)
    assert answer.status_code == 200, answer.text
    return Response.model_validate(answer.json())


def response_events(url: str, body: dict) -> list[dict]:
    """The raw events of a streamed response, each validated by the SDK's event union, its
    `event:` line naming its type, `sequence_number` counting from 0."""
    events: list[dict] = []
    with httpx.stream("POST", f"{url}/responses", json={**body, "stream": True},
                      timeout=120) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in answer.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == kind
                RESPONSE_EVENT.validate_python(data)
                events.append(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def wait_until(what: str, check: Callable[[], bool], process: subprocess.Popen[bytes],
               logs: Callable[[], str], name: str, timeout: float, poll: float = 0.1) -> None:
    """Poll `check` until it holds; fail at once (with `logs`) if `process` exits, or when
    `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        assert process.poll() is None, f"{name} exited:\n{logs()}"
        time.sleep(poll)
    pytest.fail(f"timed out waiting for {what}:\n{logs()}")


def metric_value(url: str, name: str, labels: str = "", key: str | None = None) -> float:
    """One sample from the server's /metrics (`labels` as exported, e.g. 'status="x"'),
    with `key` as the bearer token when the server has API keys."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    text = httpx.get(f"{url}/metrics", timeout=10, headers=headers).text
    series = f"{name}{{{labels}}}" if labels else name
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert match, f"{series} missing from /metrics"
    return float(match.group(1))
