"""Decode image bytes into RGB pixels no larger than a target side, as cheaply as possible.

JPEG photos, the common case, are decoded by simplejpeg (libjpeg-turbo) straight at the
smallest n/8 scale that still covers the target, so a 12 MP photo bound for 1024 px costs
a 3/8-scale decode plus a small resize. Everything else goes through Pillow: DCT `draft`
for JPEG when simplejpeg is missing or refuses the file, `reduce()` for exact integer
factors, and a bicubic resize that box-reduces first when the factor is large.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from server.images import backend
from server.images.cost import BAND_PIXELS, REDUCING_GAP, DecodeCost, decode_cost
from server.images.geometry import SizeRule
from server.images.limits import (
    DEFAULT_LIMITS,
    ImageError,
    ImageLimits,
    ImageTooLargeError,
    format_name,
)

__all__ = [
    "DecodePlan", "DecodedImage", "ImageError", "ImageLimits", "ImageTooLargeError", "SizeRule",
    "decode_image", "decode_planned", "plan_decode",
]

# Bicubic is what CLIP-style preprocessors use. With reducing_gap=2 Pillow first box-reduces
# by an integer factor when the image is over 4x the target: 2-4x faster, PSNR ≥ 45 dB.
RESAMPLE = Image.Resampling.BICUBIC

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: phone/camera JPEGs with extra pictures appended
_HIGH_DEPTH = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_RESIZABLE = frozenset({"L", "LA", "RGB", "RGBA", "RGBX"})
_PREMULTIPLIED = frozenset({"LA", "RGBA"})  # Pillow resizes these through a premultiplied copy


@dataclass(frozen=True)
class DecodedImage:
    rgb: bytes  # width * height * 3 bytes, row-major RGB
    width: int
    height: int
    content_hash: str  # blake2b-128 hex digest of the raw input bytes
    decode_s: float  # header, pixel decode and conversion to RGB
    resize_s: float  # downsizing, orientation and packing into `rgb`
    source_format: str = ""  # Pillow's name: JPEG, MPO, PNG, WEBP, GIF or BMP
    source_width: int = 0  # as stored, before orientation
    source_height: int = 0
    transposed: bool = False  # EXIF orientation 5-8: the source's sides swap places

    @property
    def oriented_source_size(self) -> tuple[int, int]:
        """The source's (width, height) as seen, before any downsizing."""
        size = (self.source_width, self.source_height)
        return size[::-1] if self.transposed else size


def content_hash(data: bytes) -> str:
    """The cache identity of an image: a hash of its raw bytes."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True)
class DecodePlan:
    """An image whose header has been read and checked: what decoding it will cost.

    Made by `plan_decode` (cheap: no pixel is decoded), carried out by `decode_planned`,
    so a caller can reserve `cost.total` bytes of a shared budget in between.
    """

    data: bytes
    image: Image.Image  # opened, header only
    box: tuple[int, int]  # the size to decode to, as stored
    scaled_jpeg: bool  # simplejpeg at n/8 scale (else Pillow)
    cost: DecodeCost
    open_s: float  # reading the header


def decode_image(
    data: bytes, size: int | SizeRule, *, limits: ImageLimits = DEFAULT_LIMITS
) -> DecodedImage:
    """Decode, orient, convert to RGB and resize to `size`'s box (an int: longest side ≤ it).

    Raises ImageTooLargeError for inputs over `limits` (the decode memory included),
    ImageError for anything else that is not an acceptable image; no other exception
    escapes for bad input.
    """
    return decode_planned(plan_decode(data, size, limits=limits))


def plan_decode(
    data: bytes, size: int | SizeRule, *, limits: ImageLimits = DEFAULT_LIMITS
) -> DecodePlan:
    """Read and check the header, and work out the decode's peak memory; refuse (413) an
    image whose decode would take more than `limits.max_decode_bytes`."""
    rule = size if isinstance(size, SizeRule) else SizeRule(size)
    limits.check_bytes(len(data))
    t0 = time.perf_counter()
    image = _open(data, limits)
    fmt, (width, height) = image.format or "", image.size
    box = rule.box(width, height)  # as stored; the rule is symmetric, so orienting is safe
    scaled = (fmt in _JPEG_FORMATS and image.mode in ("RGB", "L")
              and backend.simplejpeg is not None)
    cost = decode_cost(image, box, scaled_jpeg=scaled)
    limits.check_decode_bytes(cost.total, f"{width}x{height} {format_name(fmt)}")
    return DecodePlan(data, image, box, scaled, cost, time.perf_counter() - t0)


def decode_planned(plan: DecodePlan, digest: str = "") -> DecodedImage:
    """Decode what `plan_decode` checked: orient, convert to RGB, resize to its box.
    `digest`: content_hash of the data, when the caller has it already."""
    image, box = plan.image, plan.box
    fmt, (width, height) = image.format or "", image.size  # as stored: draft() changes size
    digest = digest or content_hash(plan.data)
    t0 = time.perf_counter()
    decoded = None
    if plan.scaled_jpeg:
        decoded = _decode_jpeg_scaled(plan.data, box)  # None: let Pillow have a go
    if decoded is not None:
        orientation = _orientation(image)
    else:
        decoded, orientation = _decode_pillow(image, box)
    t1 = time.perf_counter()
    rgb, out_w, out_h = _finish_image(decoded, box, orientation)
    t2 = time.perf_counter()
    return DecodedImage(rgb, out_w, out_h, digest, plan.open_s + t1 - t0, t2 - t1, fmt,
                        width, height, orientation >= 5)


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    """Parse the header only: format, size and mode; no pixel data is decoded here."""
    _raise_pillow_guard(limits.max_pixels)
    try:
        image = Image.open(io.BytesIO(data), formats=sorted(limits.allowed_formats))
    except Image.DecompressionBombError:
        raise ImageTooLargeError(
            f"image has too many pixels; the limit is {limits.max_pixels:,} pixels") from None
    except Exception as exc:  # Pillow raises many types for data it cannot identify
        raise _unidentified(data, limits) from exc
    limits.check_size(*image.size)
    return image


def _unidentified(data: bytes, limits: ImageLimits) -> ImageError:
    """The clearest error for bytes Pillow could not open: wrong format, or a broken one."""
    sniffed = next((fmt for fmt, test in _SIGNATURES.items() if test(data)), None)
    if sniffed is None:
        return ImageError(f"data is not a supported image ({limits.describe_formats()})")
    if sniffed not in limits.allowed_formats:
        return ImageError(f"{format_name(sniffed)} images are not accepted here; "
                          f"send {limits.describe_formats()}")
    return ImageError(f"{format_name(sniffed)} image header is corrupt or truncated")


_SIGNATURES: dict[str, Callable[[bytes], bool]] = {
    "JPEG": lambda d: d.startswith(b"\xff\xd8\xff"),
    "PNG": lambda d: d.startswith(b"\x89PNG\r\n\x1a\n"),
    "GIF": lambda d: d.startswith((b"GIF87a", b"GIF89a")),
    "WEBP": lambda d: d.startswith(b"RIFF") and d[8:12] == b"WEBP",
    "BMP": lambda d: d.startswith(b"BM"),
}


def _decode_jpeg_scaled(data: bytes, box: tuple[int, int]) -> Image.Image | None:
    """Decode at the smallest n/8 scale whose size covers `box`; None to fall back to Pillow.

    RGBX is Pillow's own layout for RGB, so the decoded buffer is mapped, not copied.
    """
    assert backend.simplejpeg is not None
    try:
        pixels = backend.simplejpeg.decode_jpeg(
            data, colorspace="RGBX", min_width=box[0], min_height=box[1])
    except Exception:
        # Recoverable libjpeg warnings (stray bytes, odd markers) are errors in strict mode;
        # Pillow tolerates those and rejects what is really broken.
        return None
    height, width = pixels.shape[:2]
    return Image.frombuffer("RGBX", (width, height), pixels, "raw", "RGBX", 0, 1)


def _decode_pillow(image: Image.Image, box: tuple[int, int]) -> tuple[Image.Image, int]:
    """Pixels in a mode `_finish_image` resizes (L, LA, RGB, RGBA, RGBX) plus the EXIF
    orientation, read before conversion drops the metadata."""
    name = format_name(image.format or "")
    try:
        if image.format in _JPEG_FORMATS and box != image.size:
            image.draft(None, box)  # DCT scaling by 1/2, 1/4 or 1/8 when ≥ 2x the target
        image.load()  # first frame only for animated GIF and WebP
        orientation = _orientation(image)  # PNG may keep EXIF after the pixels: read it now
        return _to_resizable(image), orientation
    except ImageError:
        raise
    except Exception as exc:  # truncated or corrupt data surfaces here, in many types
        raise ImageError(f"{name} image data is corrupt or truncated") from exc


def _to_resizable(image: Image.Image) -> Image.Image:
    """The cheapest full-size form that resizes correctly: grey and alpha stay as they are
    (flattened and widened to RGB only once small, see _to_rgb); only palettes, 16-bit and
    float pixels, 1-bit and other colour spaces are converted at full size."""
    if image.mode in _HIGH_DEPTH:
        image = _to_8bit_gray(image)
    if "transparency" in image.info:  # a palette or colour-key transparency: make it alpha
        return image.convert("RGBA")
    if image.mode in _RESIZABLE:
        return image
    if image.mode in ("PA", "La", "RGBa"):
        return image.convert("RGBA")
    return image.convert("L" if image.mode == "1" else "RGB")  # P, CMYK, YCbCr, LAB, HSV


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency flattened onto white (the usual page background)."""
    if image.mode in ("RGB", "RGBX"):
        return image
    if image.mode in ("LA", "RGBA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """16-bit or float grey → 8-bit, a band of rows at a time: the whole picture as numpy
    floats would take 8 bytes per pixel, several times over."""
    width, height = image.size
    out = np.empty((height, width), dtype=np.uint8)
    step = max(1, BAND_PIXELS // width)
    for top in range(0, height, step):
        values = np.asarray(image.crop((0, top, width, min(height, top + step))))
        if image.mode == "F":  # assume 0..1 floats, the common convention
            values = values * 255.0
        elif values.dtype != np.uint8:
            values = values / 257.0  # 16-bit range 0..65535 → 0..255
        out[top:top + step] = np.clip(values, 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block is ignored, as browsers do
        return 1
    return value if value in _TRANSPOSE else 1


def _finish_image(
    image: Image.Image, box: tuple[int, int], orientation: int
) -> tuple[bytes, int, int]:
    # Resize before flattening and before transposing: each then touches the small image.
    image = _to_rgb(_resize(image, box))
    if orientation != 1:
        image = image.transpose(_TRANSPOSE[orientation])
    return image.tobytes("raw", "RGB"), image.width, image.height


def _resize(image: Image.Image, box: tuple[int, int]) -> Image.Image:
    if image.size == box:
        return image
    factor, rem_w = divmod(image.width, box[0])
    if rem_w == 0 and factor > 1 and image.height == box[1] * factor:
        return _reduce(image, factor, factor)  # exact integer factor: a box filter is right
    if image.mode not in _PREMULTIPLIED:
        return image.resize(box, RESAMPLE, reducing_gap=REDUCING_GAP)
    # What resize(reducing_gap=...) does, with the box-reduce done in bands (see _reduce).
    factor_x = int(image.width / box[0] / REDUCING_GAP) or 1
    factor_y = int(image.height / box[1] / REDUCING_GAP) or 1
    if factor_x == factor_y == 1:
        return image.resize(box, RESAMPLE)
    reduced = _reduce(image, factor_x, factor_y)
    return reduced.resize(box, RESAMPLE,
                          box=(0, 0, image.width / factor_x, image.height / factor_y))


def _reduce(image: Image.Image, factor_x: int, factor_y: int) -> Image.Image:
    """image.reduce((factor_x, factor_y)), a band of rows at a time for images with alpha:
    Pillow premultiplies those into a full-size copy first (another 4 bytes a pixel). Bands
    whose height is a multiple of the factor give exactly the same pixels."""
    if image.mode not in _PREMULTIPLIED:
        return image.reduce((factor_x, factor_y))
    width, height = image.size
    rows = factor_y * max(1, BAND_PIXELS // (width * factor_y))
    out = Image.new(image.mode, (-(-width // factor_x), -(-height // factor_y)))
    for top in range(0, height, rows):
        band = image.crop((0, top, width, min(height, top + rows)))
        out.paste(band.reduce((factor_x, factor_y)), (0, top // factor_y))
    return out


def _raise_pillow_guard(max_pixels: int) -> None:
    """Keep Pillow's own decompression-bomb guard at least as wide as our limit.

    Our check of the header size is the one that answers clients; Pillow's process-wide
    guard stays as a backstop for any other Pillow use and never rejects what we allow.
    Only ever raised, so concurrent calls with different limits cannot narrow it.
    """
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


Image.MAX_IMAGE_PIXELS = DEFAULT_LIMITS.max_pixels
