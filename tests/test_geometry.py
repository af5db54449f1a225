"""SizeRule: the decode size for fixed-size and grid (dynamic-resolution) projectors."""

from __future__ import annotations

import math
import random

import pytest

from server.images import SizeRule, target_size
from server.images.geometry import smart_resize

CELL = 32  # youtuvl: 16 px patches merged 2x2


def mtmd_youtuvl_cells(width: int, height: int, max_cells: int) -> int:
    """mtmd's own youtuvl preprocessing (tools/mtmd/mtmd-image.cpp), for comparison: every side
    rounded up to whole cells, the scale lowered in 0.02 steps until the cells fit."""
    scale = 1.0
    while True:
        cols = max(1, math.ceil(width * scale / CELL))
        rows = max(1, math.ceil(height * scale / CELL))
        if cols * rows <= max_cells or scale <= 0:
            return cols * rows
        scale -= 0.02


def test_plain_rule_is_the_longest_side_cap() -> None:
    for size in ((4032, 3024), (100, 50), (10000, 2)):
        assert SizeRule(336).box(*size) == target_size(*size, 336)


@pytest.mark.parametrize("size, box", [
    ((640, 360), (640, 384)),  # 16:9: the short side rounds up to 12 cells, as mtmd does
    ((448, 448), (448, 448)),
    ((10, 10), (32, 32)),  # under one cell: enlarged to one, never refused
    ((2048, 512), (1024, 256)),  # over max_side: the long side is exactly 32 cells
    ((4000, 3000), (1024, 768)),
    ((3000, 4000), (768, 1024)),
    ((33, 31), (64, 32)),
])
def test_grid_boxes(size: tuple[int, int], box: tuple[int, int]) -> None:
    assert SizeRule(1024, CELL, 62_500).box(*size) == box


def test_max_side_is_rounded_down_to_whole_cells() -> None:
    assert SizeRule(1000, CELL).box(4000, 3000) == (992, 768)  # 31 x ceil(23.25) cells
    assert SizeRule(20, CELL).box(400, 300) == (32, 32)  # but never below one cell


@pytest.mark.parametrize("size, grid", [
    ((1024, 1024), (10, 10)),
    ((1024, 256), (20, 5)),
    ((300, 2000), (4, 25)),
])
def test_token_budget(size: tuple[int, int], grid: tuple[int, int]) -> None:
    assert SizeRule(1024, CELL, 100).grid(*size) == grid


def test_grid_never_wastes_what_mtmd_would_keep() -> None:
    """Random sizes: whole cells, within both caps, the same grid as mtmd's own rule when no
    cap binds, and never fewer tokens than mtmd's own downscaling finds."""
    rng = random.Random(7)
    for _ in range(2000):
        width, height = rng.randint(1, 3000), rng.randint(1, 3000)
        budget = rng.choice([1, 4, 50, 100, 777, 62_500])
        rule = SizeRule(1024, CELL, budget)
        box_w, box_h = rule.box(width, height)
        cols, rows = rule.grid(width, height)
        assert (box_w, box_h) == (cols * CELL, rows * CELL)
        assert max(box_w, box_h) <= 1024 and cols * rows <= budget
        assert rule.grid(height, width) == (rows, cols)  # symmetric, so EXIF rotation is safe
        if max(width, height) <= 1024:
            mtmd = mtmd_youtuvl_cells(width, height, budget)
            assert cols * rows >= mtmd, (width, height, budget)
            if mtmd_youtuvl_cells(width, height, 10**9) <= budget:
                assert cols * rows == mtmd


# mtmd's calc_size_preserved_ratio on these inputs, from its C++ source compiled as is
# (tools/mtmd/mtmd-image.cpp, llama-cpp-python 0.3.36): (w, h, factor, min_px, max_px) → box.
MTMD_SMART_RESIZE = [
    ((640, 360, 28, 6272, 3211264), (644, 364)),
    ((4032, 3024, 28, 6272, 3211264), (2044, 1540)),
    ((10, 10, 28, 6272, 3211264), (84, 84)),  # enlarged to min_pixels, rounding up
    ((1920, 1080, 28, 6272, 200704), (588, 336)),  # 256 tokens at most: 21 x 12
    ((5079, 62, 32, 1024, 65536), (2304, 32)),  # over max_pixels: the short side's floor
    ((100, 3000, 14, 3136, 1003520), (98, 2996)),
    ((333, 777, 28, 0, 3211264), (336, 784)),
    ((1, 1, 16, 0, 0), (16, 16)),
]


@pytest.mark.parametrize("args, box", MTMD_SMART_RESIZE)
def test_smart_resize_is_mtmds(args: tuple[int, int, int, int, int], box: tuple[int, int]
                               ) -> None:
    assert smart_resize(*args) == box


def test_dynamic_rule_is_a_fixed_point_of_mtmds_resize() -> None:
    """Whatever the image, the box is one mtmd keeps as it is (it copies instead of
    resizing): whole cells, within the pixel range, within the side cap unless min_pixels
    forces more (small caps, extreme aspect ratios: mtmd rounds their short side up).
    Extreme aspect ratios take several passes: mtmd's 2304x32 for 5079x62 is over
    max_pixels, so mtmd would shrink that box again."""
    rng = random.Random(7)
    for _ in range(3000):
        cell = rng.choice((14, 28, 32))
        low, high = rng.choice(((8, 4096), (70, 1120), (1, 64), (256, 16384)))
        rule = SizeRule(rng.choice((256, 1024, 2048)), cell, None, low * cell**2,
                        high * cell**2)
        width, height = rng.randint(1, 8000), rng.choice((rng.randint(1, 8000),
                                                          rng.randint(1, 40)))
        w, h = rule.box(width, height)
        assert w % cell == 0 and h % cell == 0
        assert smart_resize(w, h, cell, low * cell**2, high * cell**2) == (w, h)
        assert w * h <= high * cell**2
        if rule.max_side >= 1024 and max(width, height) <= 4 * min(width, height):
            assert max(w, h) <= rule.max_side
    assert SizeRule(8192, 32, None, 1024, 65536).box(5079, 62) == (2048, 32)  # 3 passes


def test_dynamic_rule_keeps_the_side_cap() -> None:
    """The config's image_max_side comes first: mtmd then has nothing left to shrink."""
    rule = SizeRule(1024, 28, None, 8 * 784, 4096 * 784)
    assert rule.box(4032, 3024) == (1008, 756)
    assert rule.box(640, 360) == (644, 364)  # under the cap: mtmd's own rounding only
