"""Decode image bytes into an RGB buffer no larger than a target side, fast."""

from __future__ import annotations

import hashlib
import io
import time
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP"})
# Pillow's decompression-bomb guard, checked from the header before pixels are decoded.
MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """The bytes are not an image we accept; the message is safe to show to clients."""


@dataclass(frozen=True)
class DecodedImage:
    rgb: bytes  # width * height * 3 bytes, row-major RGB
    width: int
    height: int
    content_hash: str  # hex digest of the raw input bytes
    decode_s: float
    resize_s: float


def decode_image(data: bytes, max_side: int) -> DecodedImage:
    """Decode, orient, convert to RGB and downsize so the longest side is ≤ max_side."""
    if not data:
        raise ImageError("image is empty (0 bytes)")
    content_hash = hashlib.blake2b(data, digest_size=16).hexdigest()
    t0 = time.perf_counter()
    image = _open(data)
    # JPEG DCT scaling decodes straight at 1/2, 1/4 or 1/8 size: far cheaper than a full
    # decode followed by a resize when the photo is much larger than the target.
    if image.format == "JPEG" and max(image.size) >= 2 * max_side:
        image.draft("RGB", _scaled_box(image.size, max_side))
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
    except ImageError:
        raise
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise ImageError(f"image data could not be decoded ({type(exc).__name__})") from None
    t1 = time.perf_counter()
    if max(image.size) > max_side:
        image = image.resize(_scaled_box(image.size, max_side), Image.Resampling.BICUBIC,
                             reducing_gap=3.0)
    rgb = image.tobytes()
    t2 = time.perf_counter()
    return DecodedImage(rgb, image.width, image.height, content_hash, t1 - t0, t2 - t1)


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image has too many pixels (limit {MAX_PIXELS})") from None
    except Exception:
        raise ImageError(
            "data is not a supported image (JPEG, PNG, WebP, GIF or BMP)"
        ) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError("image has no pixels")
    if width * height > MAX_PIXELS:
        raise ImageError(f"image has too many pixels ({width}x{height}, limit {MAX_PIXELS})")
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or "A" in image.getbands():
        # Flatten transparency onto white, the usual page background.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def _scaled_box(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    width, height = size
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


Image.MAX_IMAGE_PIXELS = MAX_PIXELS
