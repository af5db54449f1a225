"""Which decoders and resizer this process has: simplejpeg, Pillow or pillow-simd."""

from __future__ import annotations

import re
from types import ModuleType
from typing import Any

import PIL
from PIL import features

simplejpeg: ModuleType | None
try:  # Optional: a self-contained wheel with libjpeg-turbo, for scaled JPEG decoding.
    import simplejpeg
except ImportError:  # pragma: no cover - exercised by the fallback tests via monkeypatch
    simplejpeg = None

# pillow-simd keeps upstream's version and adds a post-release tag: "12.1.1.post0".
_SIMD_VERSION = re.compile(r"\.post\d+$")


def is_pillow_simd() -> bool:
    return bool(_SIMD_VERSION.search(PIL.__version__))


def jpeg_path() -> str:
    """The JPEG decode path `decode_image` takes in this process."""
    if simplejpeg is not None:
        return "simplejpeg-scaled"
    return "pillow-draft"


def image_backend_info() -> dict[str, Any]:
    """What decodes and resizes images here; logged at startup and shown in /api/v1/models."""
    return {
        "pillow_version": PIL.__version__,
        "pillow_simd": is_pillow_simd(),
        "pillow_libjpeg_turbo": features.version("libjpeg_turbo"),
        "pillow_webp": features.check("webp"),
        "simplejpeg": simplejpeg is not None,
        "simplejpeg_version": getattr(simplejpeg, "__version__", None),
        "jpeg_path": jpeg_path(),
    }


def image_backend() -> str:
    """One line for the startup log, e.g. 'pillow-simd 12.1.1.post0 (libjpeg-turbo 3.0.4),
    JPEG via simplejpeg-scaled'."""
    info = image_backend_info()
    name = "pillow-simd" if info["pillow_simd"] else "Pillow"
    jpeg = info["pillow_libjpeg_turbo"]
    libjpeg = f"libjpeg-turbo {jpeg}" if jpeg else "libjpeg"
    return f"{name} {info['pillow_version']} ({libjpeg}), JPEG via {info['jpeg_path']}"
