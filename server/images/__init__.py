"""Image bytes → validated, EXIF-rotated, RGB, downsized pixels. No model knowledge."""

from server.images.decode import DecodedImage, ImageError, decode_image
from server.images.sources import decode_image_reference

__all__ = ["DecodedImage", "ImageError", "decode_image", "decode_image_reference"]
