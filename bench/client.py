"""Streaming chat requests timed from the client side (what an app actually sees)."""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass

import httpx
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class StreamResult:
    ttft_s: float  # request sent → first content token
    total_s: float
    tokens: int
    text: str

    @property
    def decode_tps(self) -> float:
        """Tokens after the first, per second of streaming them."""
        span = self.total_s - self.ttft_s
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0


def stream_chat(client: httpx.Client, url: str, messages: list[dict], max_tokens: int
                ) -> StreamResult:
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    started = time.perf_counter()
    first = 0.0
    pieces: list[str] = []
    with client.stream("POST", f"{url}/chat/completions", json=body, timeout=600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content is not None and (content or choice.get("finish_reason") is None):
                    if content and not first:
                        first = time.perf_counter() - started
                    if content:
                        pieces.append(content)
    total = time.perf_counter() - started
    return StreamResult(first or total, total, len(pieces), "".join(pieces))


def photo_data_url(width: int, height: int, seed: int) -> str:
    """A JPEG with structure (gradients, shapes), different for every seed."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for i in range(12):
        x, y = (seed * 97 + i * 131) % width, (seed * 53 + i * 71) % height
        draw.ellipse((x, y, x + width // 6, y + height // 6),
                     fill=((seed * 40 + i * 20) % 256, (i * 60) % 256, (seed * 7) % 256))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def image_turn(text: str, url: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}
