"""What an image may be before we spend time on it, and the errors for when it is not."""

from __future__ import annotations

from dataclasses import dataclass, field

# The formats this package knows how to decode; `ImageLimits.allowed_formats` picks from these.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP"})
_FORMAT_NAMES = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP"}


class ImageError(ValueError):
    """The input is not an image we accept; the message is safe to show to API clients."""


class ImageTooLargeError(ImageError):
    """The image is over a size limit (bytes or pixels); the API answers 413 for it."""


@dataclass(frozen=True)
class ImageLimits:
    """Per-image limits, checked before any pixel is decoded.

    max_bytes: raw image bytes (after base64 decoding). 20 MiB, the usual hosted-API limit.
    max_pixels: width × height from the header. 8192 × 8192 (67 MP) lets through every
        phone sensor up to 50 MP. What the decode costs depends on more than the pixel
        count (format, mode, bit depth): max_decode_bytes bounds that.
    min_side: smallest accepted width or height. 2 px rejects the degenerate 1-pixel images
        (tracking pixels, placeholders, 1-px lines) that are almost always a client bug and
        carry nothing a model can see; anything larger the projector scales up as it must.
    allowed_formats: a subset of SUPPORTED_FORMATS (Pillow format names, upper case).
    max_decode_bytes: the peak memory one decode may take, worked out from the header before
        any pixel is decoded (server.images.cost). 320 MiB: a full 8192 x 8192 RGB PNG takes
        about 270 MiB (Pillow keeps RGB in 4 bytes a pixel), a big JPEG far less (it is
        decoded at a reduced scale); a 2.6 KB lossless WebP of 16383 x 4096 would take 1 GiB.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 8192 * 8192
    min_side: int = 2
    allowed_formats: frozenset[str] = field(default=SUPPORTED_FORMATS)
    max_decode_bytes: int = 320 * 1024 * 1024

    def __post_init__(self) -> None:
        formats = frozenset(f.upper() for f in self.allowed_formats)
        unknown = formats - SUPPORTED_FORMATS
        if unknown:
            raise ValueError(f"unsupported image formats {sorted(unknown)}; "
                             f"choose from {sorted(SUPPORTED_FORMATS)}")
        if not formats:
            raise ValueError("allowed_formats must name at least one format")
        if min(self.max_bytes, self.max_pixels, self.min_side, self.max_decode_bytes) < 1:
            raise ValueError("image limits must be positive")
        object.__setattr__(self, "allowed_formats", formats)

    def describe_formats(self) -> str:
        """'JPEG, PNG or WebP': the allowed formats as a client-facing phrase."""
        names = [_FORMAT_NAMES[f] for f in sorted(self.allowed_formats, key=_format_order)]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]

    def check_bytes(self, n_bytes: int) -> None:
        if n_bytes == 0:
            raise ImageError("image is empty (0 bytes)")
        if n_bytes > self.max_bytes:
            raise ImageTooLargeError(
                f"image is {n_bytes:,} bytes; the limit is {self.max_bytes:,} bytes")

    def check_decode_bytes(self, n_bytes: int, what: str) -> None:
        """`what` names the image for the message, e.g. '8192x8192 PNG'."""
        if n_bytes > self.max_decode_bytes:
            raise ImageTooLargeError(
                f"decoding this {what} image would take about {_mib(n_bytes)} of memory; "
                f"the limit is {_mib(self.max_decode_bytes)}")

    def check_size(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height} = {width * height:,} pixels; "
                f"the limit is {self.max_pixels:,} pixels")
        if min(width, height) < self.min_side:
            raise ImageError(f"image is {width}x{height} pixels; each side must be at least "
                             f"{self.min_side} pixels")


DEFAULT_LIMITS = ImageLimits()


def format_name(fmt: str) -> str:
    """Pillow's format name as clients know it: WEBP → WebP, MPO → JPEG."""
    return "JPEG" if fmt == "MPO" else _FORMAT_NAMES.get(fmt, fmt)


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"


def _format_order(name: str) -> int:
    return list(_FORMAT_NAMES).index(name)

