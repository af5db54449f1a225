"""SizeRule: the decode size for fixed-size and grid (dynamic-resolution) projectors."""

from __future__ import annotations

import math
import random

import pytest

from server.images import SizeRule, target_size

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
