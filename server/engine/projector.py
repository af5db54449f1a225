"""What the vision projector consumes, read from the mmproj GGUF header (no weights).

mtmd (tools/mtmd/mtmd.cpp, init_vision) gives each projector type one of a few image
preprocessors (tools/mtmd/mtmd-image.cpp), and clip.cpp's load_hparams gives it its merge
factor and token limits. This module keeps the same table, so one generic path sizes images
for every type: the API decodes straight to the size mtmd would resize to, and mtmd, finding
the image already that size, only copies it.

- fixed: one square of image_size px (mtmd_image_preprocessor_fixed_size); decoding larger
  only makes mtmd downsize again.
- dynamic: Qwen2-VL's "smart resize" (dyn_size: calc_size_preserved_ratio): sides rounded
  to whole (patch x merge) cells, scaled into [min_pixels, max_pixels]; one token per cell.
- grid: youtuvl's own rule: sides rounded UP to whole cells, shrunk to a token budget.
- anything else (tiles, slices, longest-edge rules): only the config's longest-side cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gguf import GGUFReader

Kind = Literal["fixed", "dynamic", "grid", "other"]

SPATIAL_MERGE = "clip.vision.spatial_merge_size"
SCALE_FACTOR = "clip.vision.projector.scale_factor"

# youtuvl: clip.cpp fixes its budget at 1..62500 tokens and ignores the GGUF's
# image_min/max_pixels; mtmd's image_max_tokens overrides the 62500.
YOUTUVL_MAX_TOKENS = 62_500


@dataclass(frozen=True)
class Sizing:
    """How mtmd sizes one projector type's images (clip.cpp load_hparams + mtmd.cpp)."""

    kind: Kind
    merge_key: str | None = None  # header key of the per-side merge factor
    merge: int = 1  # its default (clip.cpp's, for that type)
    tokens: tuple[int, int] | None = None  # set_limit_image_tokens(min, max)
    header_pixels: bool = False  # clip.vision.image_min/max_pixels, when present, win


_FIXED = Sizing("fixed")
_QWEN = Sizing("dynamic", SPATIAL_MERGE, 2, (8, 4096))

_SIZING: dict[str, Sizing] = {
    # Without image_grid_pinpoints (LLaVA-1.6 tiles), LLaVA-style projectors see one square.
    **dict.fromkeys(("mlp", "mlp_norm", "ldp", "ldpv2", "cogvlm", "janus_pro", "glm_edge",
                     "yasa2", "nemotron_v2_vl", "gemma3", "gemma3nv"), _FIXED),
    **dict.fromkeys(("qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger", "ling3vl"),
                    _QWEN),
    # GLM-4.1V / 4.5V / 4.6V: merge 2, bicubic, 8..4096 tokens (clip.cpp PROJECTOR_TYPE_GLM4V).
    "glm4v": Sizing("dynamic", SPATIAL_MERGE, 2, (8, 4096)),
    "mimovl": Sizing("dynamic", SPATIAL_MERGE, 2, header_pixels=True),
    "minimax_m3": Sizing("dynamic", SPATIAL_MERGE, 2, (8, 576)),
    "pixtral": Sizing("dynamic", SPATIAL_MERGE, 1, (8, 1024)),
    "phi4": Sizing("dynamic", header_pixels=True),
    "kimivl": Sizing("dynamic", SCALE_FACTOR, 1, (8, 1024)),
    "kimik25": Sizing("dynamic", SCALE_FACTOR, 1, (2, 4096), header_pixels=True),
    "dots_ocr": Sizing("dynamic", SCALE_FACTOR, 1, header_pixels=True),
    "dots3note_v": Sizing("dynamic", SPATIAL_MERGE, 1, header_pixels=True),
    "paddleocr": Sizing("dynamic", None, 2, header_pixels=True),
    "gemma4v": Sizing("dynamic", SCALE_FACTOR, 3, (70, 1120)),
    "gemma4uv": Sizing("dynamic", SCALE_FACTOR, 3, (70, 1120)),
    "hunyuanvl": Sizing("dynamic", SPATIAL_MERGE, 2, (256, 16384), header_pixels=True),
    "exaone4_5": Sizing("dynamic", SPATIAL_MERGE, 2, header_pixels=True),
    "youtuvl": Sizing("grid", SPATIAL_MERGE, 2, (1, YOUTUVL_MAX_TOKENS)),
}

# Projectors whose images mtmd wraps in begin/end tokens (youtuvl and Qwen: <|vision_start|>
# ... <|vision_end|>; GLM-4V: <|begin_of_image|> ... <|end_of_image|>) and whose chat
# templates put the text right after the end token, with no separator; LLaVA-1.5 puts "\n"
# after its image.
_WRAPPED_TYPES = frozenset({"youtuvl", "glm4v", "qwen2vl_merger", "qwen2.5vl_merger",
                            "qwen3vl_merger"})


@dataclass(frozen=True)
class ImageGeometry:
    """How the API should size images for this projector (see server.images.SizeRule)."""

    max_side: int  # longest side in pixels
    cell: int = 1  # sides are whole multiples of this; each cell is one image token
    max_cells: int | None = None  # image tokens per image (grid)
    min_pixels: int | None = None  # dynamic: the pixel range mtmd scales into
    max_pixels: int | None = None


@dataclass(frozen=True)
class ProjectorInfo:
    projector_type: str
    image_size: int
    patch_size: int
    spatial_merge: int
    min_pixels: int | None  # clip.vision.image_min_pixels as stored in the header
    max_pixels: int | None
    tiled: bool  # LLaVA-1.6 style grid pinpoints: several crops per image

    @property
    def sizing(self) -> Sizing:
        return _SIZING.get(self.projector_type, Sizing("other"))

    @property
    def kind(self) -> Kind:
        kind = self.sizing.kind
        if kind == "fixed" and self.tiled:
            return "other"  # llava_uhd slices: several crops, no single target size
        if kind in ("dynamic", "grid") and self.patch_size <= 0:
            return "other"
        return kind

    @property
    def native_side(self) -> int | None:
        """The longest image side worth decoding to, or None when the projector can use more."""
        return self.image_size if self.kind == "fixed" else None

    @property
    def cell(self) -> int | None:
        """Pixels per side of one image token for dynamic and grid projectors, else None."""
        if self.kind in ("dynamic", "grid"):
            return self.patch_size * self.spatial_merge
        return None

    @property
    def wraps_images(self) -> bool:
        return self.projector_type in _WRAPPED_TYPES

    def pixel_limits(self, max_tokens: int | None = None) -> tuple[int, int] | None:
        """(min, max) pixels a dynamic projector scales images into, as clip.cpp sets them:
        the header's values for types that read them, else the type's token limits (the
        maximum replaced by mtmd's image_max_tokens when configured)."""
        sizing, cell = self.sizing, self.cell
        if cell is None:
            return None
        if sizing.header_pixels and self.min_pixels and self.max_pixels:
            return self.min_pixels, self.max_pixels
        if sizing.tokens is None:
            return None  # mtmd would refuse this file (its required keys are missing)
        low, high = sizing.tokens
        # A budget under the projector's minimum (a small `low` detail) stops at the minimum.
        return low * cell * cell, max(max_tokens or high, low) * cell * cell

    def geometry(self, max_side: int, max_tokens: int | None = None) -> ImageGeometry:
        """The decode size within the config's `max_side` (and image_max_tokens, if set)."""
        kind, cell = self.kind, self.cell
        if kind == "fixed":
            return ImageGeometry(min(max_side, self.image_size))
        if cell is None:
            return ImageGeometry(max_side)
        # Round the cap down to whole cells (at least one) so rounding never exceeds it.
        side = max(cell, max_side // cell * cell)
        if kind == "grid":
            return ImageGeometry(side, cell, max_tokens or YOUTUVL_MAX_TOKENS)
        limits = self.pixel_limits(max_tokens)
        if limits is None:
            return ImageGeometry(max_side)
        return ImageGeometry(side, cell, None, *limits)


def read_projector_info(mmproj: Path) -> ProjectorInfo:
    fields = GGUFReader(str(mmproj)).fields

    def value(key: str) -> object:
        field = fields.get(key)
        return field.contents() if field is not None else None

    def integer(key: str) -> int | None:
        raw = value(key)
        return int(raw) if isinstance(raw, int) else None

    # clip.cpp's key order for the type: files with several modalities use the second.
    projector_type = str(value("clip.projector_type") or value("clip.vision.projector_type")
                         or "unknown")
    sizing = _SIZING.get(projector_type, Sizing("other"))
    merge = (integer(sizing.merge_key) if sizing.merge_key else None) or sizing.merge
    return ProjectorInfo(
        projector_type=projector_type,
        image_size=integer("clip.vision.image_size") or 0,
        patch_size=integer("clip.vision.patch_size") or 0,
        spatial_merge=merge,
        min_pixels=integer("clip.vision.image_min_pixels"),
        max_pixels=integer("clip.vision.image_max_pixels"),
        tiled=value("clip.vision.image_grid_pinpoints") is not None,
    )
