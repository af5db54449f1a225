"""Request bodies for the bench, built before the clock starts.

Every request gets a unique prompt prefix and, for image requests, unique pixels: the
server reuses KV prefixes and (keyed by content) image embeddings, and a bench that hits
those caches would time the cache, not the work.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

JPEG_QUALITY = 90


@dataclass(frozen=True)
class ImageSpec:
    """A synthetic photo-like image of `size`, or the picture in `path`."""

    size: tuple[int, int] = (1920, 1080)
    path: Path | None = None

    def base(self) -> Image.Image:
        if self.path is not None:
            with Image.open(self.path) as image:
                return image.convert("RGB")
        return synthetic_photo(*self.size)

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"{self.size[0]}x{self.size[1]} synthetic JPEG"


def synthetic_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients and shapes plus mild noise: compresses like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin(x / (width / 5.0)) * np.cos(y / (height / 3.0))
    g = 255 * x / max(1, width - 1)
    b = 255 * (1 - y / max(1, height - 1))
    pixels = np.stack([r, g, b], axis=-1)
    pixels += rng.normal(0, 8, pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    side = max(8, min(width, height) // 4)
    image.paste((240, 240, 240), (width // 5, height // 5, width // 5 + side, height // 5 + side))
    return image


def unique_jpeg(base: Image.Image, index: int) -> bytes:
    """`base` with a small block coloured after `index`, so its content hash is new."""
    image = base.copy()
    block = max(4, min(image.size) // 32)
    colour = ((index * 67) % 256, (index * 131) % 256, (index * 29 + 100) % 256)
    image.paste(colour, (0, 0, block, block))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


class BodyFactory:
    """Serialized chat bodies (streaming, with usage), unique per request and per run."""

    def __init__(self, model: str, prompt: str, max_tokens: int, image: ImageSpec) -> None:
        self.model = model
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.image = image
        self._base: Image.Image | None = None
        self._run = secrets.token_hex(3)  # a second run must not hit the first one's KV
        self._count = 0
        self.last_image_bytes = 0

    def make(self, kind: str) -> bytes:
        self._count += 1
        # The nonce goes first: everything after the first differing token is evaluated.
        text = f"[{self._run}-{self._count}] {self.prompt}"
        content: str | list[dict[str, object]] = text
        if kind == "image":
            if self._base is None:
                self._base = self.image.base()
            jpeg = unique_jpeg(self._base, self._count)
            self.last_image_bytes = len(jpeg)
            url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
            content = [{"type": "text", "text": text},
                       {"type": "image_url", "image_url": {"url": url}}]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            # What deployed apps send (CONTEXT.md): sampling cost is part of the measurement.
            "temperature": 0.7,
            "top_p": 0.9,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return json.dumps(body).encode()

