"""What the vision projector consumes, read from the mmproj GGUF header (no weights)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFReader

# Projectors that see one fixed-size square: anything larger is only downsized again by
# mtmd's preprocessing, so decoding straight to that size loses nothing.
_FIXED_SIZE_TYPES = frozenset({"mlp", "mlp_norm", "ldp", "ldpv2"})

# youtuvl (tools/mtmd/clip.cpp and mtmd-image.cpp in the vendored llama.cpp): the image is
# cut into patch x merge squares, one token each; every side is rounded UP to whole squares
# (so an image under one square is enlarged to it: nothing is ever rejected) and images over
# the token budget are shrunk until they fit. clip.cpp fixes that budget at 1..62500 tokens
# and ignores the GGUF's image_min/max_pixels; mtmd's image_max_tokens overrides the 62500.
_GRID_TYPES = frozenset({"youtuvl"})
YOUTUVL_MAX_TOKENS = 62_500

# Projectors whose images mtmd wraps in begin/end tokens (youtuvl: <|vision_start|> ...
# <|vision_end|>) and whose processors put the text right after the end token, with no
# separator; LLaVA-1.5 puts "\n" after its image.
_WRAPPED_TYPES = frozenset({"youtuvl"})


@dataclass(frozen=True)
class ImageGeometry:
    """How the API should size images for this projector (see server.images.SizeRule)."""

    max_side: int  # longest side in pixels
    cell: int = 1  # sides are whole multiples of this; each cell is one image token
    max_cells: int | None = None  # image tokens per image


@dataclass(frozen=True)
class ProjectorInfo:
    projector_type: str
    image_size: int
    patch_size: int
    spatial_merge: int
    min_pixels: int | None
    max_pixels: int | None
    tiled: bool  # LLaVA-1.6 style grid pinpoints: several crops per image

    @property
    def native_side(self) -> int | None:
        """The longest image side worth decoding to, or None when the projector can use more."""
        if self.projector_type in _FIXED_SIZE_TYPES and not self.tiled:
            return self.image_size
        return None

    @property
    def cell(self) -> int | None:
        """Pixels per side of one image token for grid projectors, else None."""
        if self.projector_type in _GRID_TYPES and self.patch_size > 0:
            return self.patch_size * self.spatial_merge
        return None

    @property
    def wraps_images(self) -> bool:
        return self.projector_type in _WRAPPED_TYPES

    def geometry(self, max_side: int, max_tokens: int | None = None) -> ImageGeometry:
        """The decode size within the config's `max_side` (and image_max_tokens, if set)."""
        native = self.native_side
        if native is not None:
            return ImageGeometry(min(max_side, native))
        cell = self.cell
        if cell is None:
            return ImageGeometry(max_side)
        # Round the cap down to whole cells (at least one) so rounding up never exceeds it.
        side = max(cell, max_side // cell * cell)
        return ImageGeometry(side, cell, max_tokens or YOUTUVL_MAX_TOKENS)


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
        spatial_merge=integer("clip.vision.spatial_merge_size") or 2,  # clip.cpp's default
        min_pixels=integer("clip.vision.image_min_pixels"),
        max_pixels=integer("clip.vision.image_max_pixels"),
        tiled=value("clip.vision.image_grid_pinpoints") is not None,
    )
