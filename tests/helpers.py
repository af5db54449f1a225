"""Small builders shared by the tests."""

from __future__ import annotations

import base64
import io
import json
import threading

import httpx
from PIL import Image


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


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(text: str, url: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": url}}]}


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
