"""Small builders shared by the tests."""

from __future__ import annotations

import base64
import io

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
