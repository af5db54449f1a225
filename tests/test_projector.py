"""ProjectorInfo: what each family's mmproj header says about image sizes and wrapping."""

from __future__ import annotations

from server.demo_model import DemoModelPaths
from server.engine.projector import YOUTUVL_MAX_TOKENS, ImageGeometry, read_projector_info


def test_llava_sees_one_fixed_square(demo_model: DemoModelPaths) -> None:
    info = read_projector_info(demo_model.mmproj)
    assert (info.projector_type, info.image_size, info.patch_size) == ("mlp", 112, 14)
    assert info.geometry(1024) == ImageGeometry(112)  # decoded straight to the native side
    assert info.geometry(64) == ImageGeometry(64)  # a smaller config cap still wins
    assert info.cell is None and not info.wraps_images


def test_youtuvl_is_a_grid_of_32_px_tokens(youtu_model: DemoModelPaths) -> None:
    info = read_projector_info(youtu_model.mmproj)
    assert (info.projector_type, info.patch_size, info.spatial_merge) == ("youtuvl", 16, 2)
    assert info.native_side is None and info.cell == 32 and info.wraps_images
    # The GGUF carries no min/max pixels (clip.cpp ignores them for youtuvl anyway).
    assert info.min_pixels is None and info.max_pixels is None
    assert info.geometry(1024) == ImageGeometry(1024, 32, YOUTUVL_MAX_TOKENS)
    assert info.geometry(1000, 256) == ImageGeometry(992, 32, 256)  # whole cells, budget
    assert info.geometry(10) == ImageGeometry(32, 32, YOUTUVL_MAX_TOKENS)  # at least one cell
