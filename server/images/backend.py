"""Which Pillow decodes our images, for the startup log: plain Pillow or pillow-simd."""

from __future__ import annotations

from importlib import metadata

import PIL
from PIL import features


def image_backend() -> str:
    """E.g. 'Pillow 11.0.0 (libjpeg-turbo 3.0.4)' or 'pillow-simd 9.5.0.post2 (libjpeg 9)'."""
    name = "pillow-simd" if _is_simd() else "Pillow"
    if features.check_feature("libjpeg_turbo"):
        jpeg = f"libjpeg-turbo {features.version_feature('libjpeg_turbo')}"
    else:
        jpeg = f"libjpeg {features.version('jpg')}"
    return f"{name} {PIL.__version__} ({jpeg})"


def _is_simd() -> bool:
    # pillow-simd installs as its own distribution and versions itself X.Y.Z.postN.
    try:
        metadata.distribution("Pillow-SIMD")
    except metadata.PackageNotFoundError:
        return ".post" in PIL.__version__
    return True
