"""Turn an OpenAI `image_url` value (data URL or raw base64) into image bytes."""

from __future__ import annotations

import binascii
import re

import pybase64

from server.images.decode import DecodedImage, decode_image
from server.images.geometry import SizeRule
from server.images.limits import DEFAULT_LIMITS, ImageError, ImageLimits, ImageTooLargeError

_WHITESPACE = re.compile(r"\s+")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)"
                       r"(?P<b64>;base64)?,", re.ASCII)
# Base64 wrapped at 76 columns carries one line break per 76 characters; allow for CRLF.
_WRAP_SLACK = 2 / 76


def image_bytes_from_url(url: str, *, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """Bytes from a `data:image/...;base64,` URL or a bare base64 string.

    Over-long payloads are refused before they are decoded, so an oversized upload costs
    no base64 work and no second copy in memory.
    """
    url = url.strip()
    if url.startswith("data:"):
        match = _DATA_URL.match(url)
        if match is None or not match.group("b64"):
            raise ImageError("data URL must be of the form data:image/<type>;base64,<data>")
        mime = (match.group("mime") or "").lower()
        if not mime.startswith("image/"):
            raise ImageError(f"data URL media type must be image/*, got {mime or 'none'!r}")
        payload = url[match.end():]
    elif url.startswith(("http://", "https://")):
        raise ImageError("remote image URLs are not enabled on this server; send base64 data")
    elif "://" in url[:16]:
        raise ImageError("unsupported image URL scheme; send a data URL or base64 data")
    else:
        payload = url
    max_chars = (limits.max_bytes + 2) // 3 * 4
    if len(payload) > max_chars * (1 + _WRAP_SLACK) + 4:
        raise ImageTooLargeError(f"image is about {len(payload) * 3 // 4:,} bytes; "
                                 f"the limit is {limits.max_bytes:,} bytes")
    data = _b64decode(payload)
    limits.check_bytes(len(data))
    return data


def decode_image_reference(
    url: str, size: int | SizeRule, *, limits: ImageLimits = DEFAULT_LIMITS
) -> DecodedImage:
    """An `image_url` value → decoded, oriented, RGB pixels sized by `size` (see decode_image)."""
    return decode_image(image_bytes_from_url(url, limits=limits), size, limits=limits)


def _b64decode(payload: str) -> bytes:
    try:
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        pass
    # Some clients wrap base64 at 76 columns; accept that, but only that.
    try:
        return pybase64.b64decode(_WHITESPACE.sub("", payload), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data is not valid base64") from None
