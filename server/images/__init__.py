"""Image bytes → validated, EXIF-rotated, RGB, downsized pixels. No model or HTTP knowledge."""

from server.images.backend import image_backend_info
from server.images.decode import DecodedImage, content_hash, decode_image
from server.images.geometry import SizeRule, target_size
from server.images.limits import (
    DEFAULT_LIMITS,
    SUPPORTED_FORMATS,
    ImageError,
    ImageLimits,
    ImageTooLargeError,
)
from server.images.sources import decode_image_reference, image_bytes_from_url

__all__ = [
    "DEFAULT_LIMITS",
    "SUPPORTED_FORMATS",
    "DecodedImage",
    "ImageError",
    "ImageLimits",
    "ImageTooLargeError",
    "SizeRule",
    "content_hash",
    "decode_image",
    "decode_image_reference",
    "image_backend_info",
    "image_bytes_from_url",
    "target_size",
]
