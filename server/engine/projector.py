"""What the vision projector consumes, read from the mmproj GGUF header (no weights)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFReader

# Projectors that see one fixed-size square: anything larger is only downsized again by
# mtmd's preprocessing, so decoding straight to that size loses nothing.
_FIXED_SIZE_TYPES = frozenset({"mlp", "mlp_norm", "ldp", "ldpv2"})


@dataclass(frozen=True)
class ProjectorInfo:
    projector_type: str
    image_size: int
    patch_size: int
    min_pixels: int | None
    max_pixels: int | None
    tiled: bool  # LLaVA-1.6 style grid pinpoints: several crops per image

    @property
    def native_side(self) -> int | None:
        """The longest image side worth decoding to, or None when the projector can use more."""
        if self.projector_type in _FIXED_SIZE_TYPES and not self.tiled:
            return self.image_size
        return None


def read_projector_info(mmproj: Path) -> ProjectorInfo:
    fields = GGUFReader(str(mmproj)).fields

    def value(key: str) -> object:
        field = fields.get(key)
        return field.contents() if field is not None else None

    def integer(key: str) -> int | None:
        raw = value(key)
        return int(raw) if isinstance(raw, int) else None

    return ProjectorInfo(
        projector_type=str(value("clip.projector_type") or "unknown"),
        image_size=integer("clip.vision.image_size") or 0,
        patch_size=integer("clip.vision.patch_size") or 0,
        min_pixels=integer("clip.vision.image_min_pixels"),
        max_pixels=integer("clip.vision.image_max_pixels"),
        tiled=value("clip.vision.image_grid_pinpoints") is not None,
    )
