"""ProjectorInfo: what each family's mmproj header says about image sizes and wrapping."""

from __future__ import annotations

from server.config import Settings
from server.demo_model import DemoModelPaths
from server.engine.model import detail_geometries
from server.engine.projector import (
    YOUTUVL_MAX_TOKENS,
    ImageGeometry,
    ProjectorInfo,
    read_projector_info,
)


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


def header(projector_type: str, *, patch: int = 14, merge: int = 2, image_size: int = 336,
           min_pixels: int | None = None, max_pixels: int | None = None,
           tiled: bool = False) -> ProjectorInfo:
    """What read_projector_info returns for such a header (no file needed)."""
    return ProjectorInfo(projector_type, image_size, patch, merge, min_pixels, max_pixels, tiled)


def test_qwen_style_projectors_size_by_pixels_into_the_token_range() -> None:
    """qwen2vl/2.5vl/3vl, glm4v: whole 28 px cells (14 px patches merged 2x2), scaled into
    clip.cpp's 8..4096 tokens; image_max_tokens replaces the 4096, as it does in mtmd."""
    for kind in ("qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger", "glm4v"):
        info = header(kind)
        assert info.kind == "dynamic" and info.cell == 28 and info.native_side is None
        assert info.geometry(1024) == ImageGeometry(1008, 28, None, 8 * 784, 4096 * 784)
        assert info.geometry(1024, 256) == ImageGeometry(1008, 28, None, 8 * 784, 256 * 784)
        # A budget under the projector's minimum (a small `low` detail) stops at it.
        assert info.geometry(512, 4) == ImageGeometry(504, 28, None, 8 * 784, 8 * 784)
    assert header("glm4v").wraps_images and header("qwen2.5vl_merger").wraps_images


def test_header_pixel_limits_win_for_the_types_that_read_them() -> None:
    phi4 = header("phi4", merge=1, min_pixels=256 * 196, max_pixels=1024 * 196)
    assert phi4.geometry(2048) == ImageGeometry(2044, 14, None, 256 * 196, 1024 * 196)
    # Qwen's clip.cpp branch never reads them: its own 8..4096 tokens stand.
    qwen = header("qwen2vl_merger", min_pixels=1, max_pixels=10**9)
    assert qwen.pixel_limits() == (8 * 784, 4096 * 784)
    # A type that needs them but has none (mtmd would refuse the file): the longest side only.
    assert header("phi4", merge=1).geometry(1024) == ImageGeometry(1024)


def test_fixed_tiled_and_unknown_projectors() -> None:
    assert header("gemma3", patch=14, image_size=896).geometry(1024) == ImageGeometry(896)
    # LLaVA-1.6 pinpoints: several crops per image, so no single target: the cap alone.
    assert header("mlp", tiled=True).geometry(1024) == ImageGeometry(1024)
    assert header("idefics3").geometry(1024) == ImageGeometry(1024)  # slices
    assert header("zzz").kind == "other" and header("zzz").geometry(777) == ImageGeometry(777)


def test_detail_geometries_from_the_settings(youtu_model: DemoModelPaths,
                                             demo_model: DemoModelPaths) -> None:
    youtu = read_projector_info(youtu_model.mmproj)
    settings = Settings(model=youtu_model.text, image_max_side=400, image_max_tokens=48)
    sizes = detail_geometries(settings, youtu)
    assert sizes["auto"] == ImageGeometry(384, 32, 48)
    # `low` never above `auto` (512 px, 64 tokens by default, here capped at 400 px, 48).
    assert sizes["low"] == ImageGeometry(384, 32, 48)
    assert sizes["high"] == ImageGeometry(2048, 32, YOUTUVL_MAX_TOKENS)  # projector's own
    llava = detail_geometries(Settings(model=demo_model.text), read_projector_info(
        demo_model.mmproj))
    assert set(llava.values()) == {ImageGeometry(112)}  # fixed size: detail changes nothing
