"""The peak memory a decode will take, worked out from the image header alone.

Small files can hold huge pictures (a 2.6 KB lossless WebP of 16383x4096 decodes to over a
gigabyte), so the bytes of the file say nothing; the header's size, mode and format do.
The figures follow what `decode_image` really allocates, buffer by buffer, and were
checked against the peak RSS of real decodes (tests/test_decode_budget.py):

- Pillow keeps every pixel in 1 byte (1, L, P), 2 (I;16) or 4 (everything else, RGB
  included: Pillow pads it to RGBX).
- WebP goes through libwebp's animation decoder, even for still pictures: a canvas and the
  previous canvas of 4 bytes per pixel, a copy handed to Python, then Pillow's own image.
- Progressive JPEGs keep every DCT coefficient of the full-size picture (2 bytes each) until
  the last scan, whatever scale they are decoded at; baseline ones stream row by row.
- JPEG is decoded straight at a reduced scale (simplejpeg: any n/8, Pillow's draft: 1/2,
  1/4, 1/8), so a big photo costs its scaled size, not its full size.
- Palettes, 16-bit grey and the like are converted at full size, while the decoded picture
  is still alive; grey and alpha are resized first and made RGB once small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

# Bytes per pixel of Pillow's image storage, by mode.
_ONE_BYTE = frozenset({"1", "L", "P"})
_TWO_BYTES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
HIGH_DEPTH = _TWO_BYTES | {"I", "F"}
_RESIZABLE = frozenset({"L", "LA", "RGB", "RGBA", "RGBX"})
REDUCING_GAP = 2.0  # decode.py's resize: box-reduce first to within this factor of the target
_WEBP_BUFFERS = 4  # canvas, previous canvas, the copy for Python, Pillow's image (4 B/px each)
_SLACK = 8 * 1024 * 1024  # decoder state, row buffers, Python objects: small and fixed
# decode.py converts 16-bit grey and box-reduces alpha images a band of rows at a time.
BAND_PIXELS = 1 << 18
_GRAY_BAND_BYTES = BAND_PIXELS * 32  # the band's crop, its array, three float64 steps
_ALPHA_BAND_BYTES = BAND_PIXELS * 12  # the band's crop and Pillow's premultiplied copy


def mode_bytes(mode: str) -> int:
    if mode in _ONE_BYTE:
        return 1
    if mode in _TWO_BYTES:
        return 2
    return 4


@dataclass(frozen=True)
class DecodeCost:
    """Estimated peak bytes of one decode, and the size it decodes at."""

    total: int
    decoded_size: tuple[int, int]  # after DCT scaling; the stored size for everything else


def decode_cost(image: Image.Image, box: tuple[int, int], *, scaled_jpeg: bool,
                pillow_fallback: bool = True) -> DecodeCost:
    """Peak bytes to decode `image` (opened, not loaded) and resize it into `box`.

    scaled_jpeg: a JPEG goes through simplejpeg at the smallest n/8 scale covering `box`;
    pillow_fallback: it may still fall back to Pillow's draft (simplejpeg refuses the file),
    so the dearer of the two counts.
    """
    fmt, (width, height) = image.format or "", image.size
    if fmt in ("JPEG", "MPO"):
        coefficients = _coefficient_bytes(image) if _progressive(image) else 0
        costs = []
        if scaled_jpeg:  # an RGBX buffer at the scaled size
            size = _turbo_scaled(width, height, box)
            costs.append(DecodeCost(size[0] * size[1] * 4 + _resize_cost(size, box), size))
        if not scaled_jpeg or pillow_fallback:
            size = _draft_scaled(width, height, box)
            pixels = size[0] * size[1]
            held = pixels * mode_bytes(image.mode) + _conversion_cost(image, pixels)
            costs.append(DecodeCost(held + _resize_cost(size, box), size))
        worst = max(c.total for c in costs)
        return DecodeCost(coefficients + worst + _SLACK, costs[0].decoded_size)
    pixels = width * height
    grey = (image.mode in HIGH_DEPTH or image.mode in ("1", "L")) \
        and "transparency" not in image.info
    resize = _resize_cost((width, height), box, 1 if grey else 4) \
        + _premultiplied_cost(image, box)
    if fmt == "WEBP":
        # While loading, all four buffers; afterwards the decoder's two canvases stay with
        # the open image, beside Pillow's copy (RGB or RGBA: resized as it is).
        held = pixels * 4 * (_WEBP_BUFFERS - 1)
        peak = max(pixels * 4 * _WEBP_BUFFERS, held + resize)
        return DecodeCost(peak + _SLACK, (width, height))
    held = pixels * mode_bytes(image.mode) + _conversion_cost(image, pixels)
    return DecodeCost(held + resize + _SLACK, (width, height))


def _conversion_cost(image: Image.Image, pixels: int) -> int:
    """What decode._to_resizable allocates at full size, beside the decoded picture (which
    stays alive until the decode ends)."""
    mode = image.mode
    extra = 0
    if mode in HIGH_DEPTH:
        extra += pixels + _GRAY_BAND_BYTES  # the 8-bit grey copy, made band by band
        mode = "L"
    if "transparency" in image.info or mode in ("PA", "La", "RGBa"):
        return extra + pixels * 4 + _ALPHA_BAND_BYTES  # an RGBA copy, then reduced in bands
    if mode in ("LA", "RGBA"):
        return extra + _ALPHA_BAND_BYTES
    if mode in _RESIZABLE:
        return extra
    return extra + pixels * mode_bytes("L" if mode == "1" else "RGB")


def _premultiplied_cost(image: Image.Image, box: tuple[int, int]) -> int:
    """Pillow resizes an image with alpha through a premultiplied copy: of the whole image
    when it needs no box-reduce first (under twice REDUCING_GAP times the box), else of the
    reduced one (decode.py reduces in bands, so the full-size image is never copied)."""
    has_alpha = (image.mode in ("LA", "RGBA", "PA", "La", "RGBa")
                 or "transparency" in image.info)
    w, h = image.size
    if not has_alpha or (w, h) == box:
        return 0
    if w % box[0] == 0 and w // box[0] > 1 and h == box[1] * (w // box[0]):
        return 0  # an exact integer factor: reduced straight to the box, nothing resized
    factor_x = int(w / box[0] / REDUCING_GAP) or 1
    factor_y = int(h / box[1] / REDUCING_GAP) or 1
    return math.ceil(w / factor_x) * math.ceil(h / factor_y) * 4


def _resize_cost(size: tuple[int, int], box: tuple[int, int], pixel_bytes: int = 4) -> int:
    """Pillow's box-reduced intermediate (resize with reducing_gap; `pixel_bytes` a pixel:
    1 for grey, which is resized before it becomes RGB), the resized image, its RGB
    flattening and transposition, and the packed RGB bytes."""
    w, h = size
    factor_x = int(w / box[0] / REDUCING_GAP) or 1
    factor_y = int(h / box[1] / REDUCING_GAP) or 1
    reduced = 0
    if factor_x > 1 or factor_y > 1:
        reduced = math.ceil(w / factor_x) * math.ceil(h / factor_y) * pixel_bytes
    out = box[0] * box[1]
    return reduced + out * 4 * 3 + out + out * 3


def _turbo_scaled(width: int, height: int, box: tuple[int, int]) -> tuple[int, int]:
    """libjpeg-turbo's output size at the smallest n/8 scale that still covers `box`."""
    for n in range(1, 9):
        w, h = math.ceil(width * n / 8), math.ceil(height * n / 8)
        if w >= box[0] and h >= box[1]:
            return w, h
    return width, height


def _draft_scaled(width: int, height: int, box: tuple[int, int]) -> tuple[int, int]:
    """Pillow's draft(): the largest of 1/8, 1/4, 1/2 that keeps both sides ≥ the box."""
    if (width, height) == box:
        return width, height
    scale = min(width // max(1, box[0]), height // max(1, box[1]))
    for s in (8, 4, 2):
        if scale >= s:
            return math.ceil(width / s), math.ceil(height / s)
    return width, height


def _progressive(image: Image.Image) -> bool:
    return bool(image.info.get("progressive") or image.info.get("progression"))


def _coefficient_bytes(image: Image.Image) -> int:
    """The full-size DCT coefficient buffer a progressive JPEG needs: 2 bytes per
    coefficient, each component at its own sampling, in whole 8x8 blocks."""
    width, height = image.size
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * 3
    h_max = max(layer[1] for layer in layers)
    v_max = max(layer[2] for layer in layers)
    total = 0
    for _, h, v, _ in layers:
        blocks_w = math.ceil(math.ceil(width * h / h_max) / 8)
        blocks_h = math.ceil(math.ceil(height * v / v_max) / 8)
        total += blocks_w * blocks_h * 64 * 2
    return total
