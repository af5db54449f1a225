"""Streaming chat requests timed from the client side (what an app actually sees)."""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass

import httpx
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class ChatResult:
    seconds: float  # request sent → whole answer received
    tokens: int  # usage.completion_tokens, as the server counted them
    text: str


def chat(client: httpx.Client, url: str, messages: list[dict], max_tokens: int) -> ChatResult:
    """One non-streaming greedy request. Non-streaming on purpose: llama_cpp.server sends
    its whole stream at the end, so client-side stream timings would not compare; with
    max_tokens=1 the request time is the time to first token on any server."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens,
            "temperature": 0}
    started = time.perf_counter()
    resp = client.post(f"{url}/chat/completions", json=body, timeout=600)
    resp.raise_for_status()
    seconds = time.perf_counter() - started
    reply = resp.json()
    return ChatResult(seconds, int(reply["usage"]["completion_tokens"]),
                      reply["choices"][0]["message"]["content"] or "")


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
