"""Already-decoded RGB pixels → a smaller size rule's box (an upload stored for `high`
detail, sent with `auto` or `low`). Same resampling as decoding, no file to read again."""

from __future__ import annotations

import time
from dataclasses import dataclass

from PIL import Image

from server.images.decode import _resize


@dataclass(frozen=True)
class Rescaled:
    rgb: bytes
    width: int
    height: int
    resize_s: float


def rescale_cost(width: int, height: int) -> int:
    """Peak bytes of rescaling: Pillow holds RGB at 4 bytes a pixel, the source once and
    at most its box-reduced copy and the result again, plus the packed output."""
    return width * height * (4 + 4 + 3)


def rescale_rgb(rgb: bytes, width: int, height: int, box: tuple[int, int]) -> Rescaled:
    t0 = time.perf_counter()
    if box == (width, height):
        return Rescaled(rgb, width, height, 0.0)
    image = _resize(Image.frombytes("RGB", (width, height), rgb), box)
    return Rescaled(image.tobytes("raw", "RGB"), image.width, image.height,
                    time.perf_counter() - t0)
