"""Turn an OpenAI `image_url` value (data URL or raw base64) into image bytes."""

from __future__ import annotations

import binascii
import re

import pybase64

from server.images.decode import DecodedImage, ImageError, decode_image

_WHITESPACE = re.compile(r"\s+")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)"
                       r"(?P<b64>;base64)?,", re.ASCII)


def image_bytes_from_url(url: str) -> bytes:
    """Bytes from a `data:image/...;base64,` URL or a bare base64 string."""
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
    try:
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        pass
    # Some clients wrap base64 at 76 columns; accept that, but only that.
    try:
        return pybase64.b64decode(_WHITESPACE.sub("", payload), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data is not valid base64") from None


def decode_image_reference(url: str, max_side: int) -> DecodedImage:
    return decode_image(image_bytes_from_url(url), max_side)
