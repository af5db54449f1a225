"""The pixel size an image is decoded to, from limits stated in the projector's own terms."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SizeRule:
    """Longest side at most `max_side`; with `multiple` > 1, also a grid of whole cells.

    Grid projectors (a ViT whose tokens each cover multiple x multiple pixels) round every
    side up to whole cells and shrink images over `max_cells` cells. Dynamic projectors
    (`max_pixels` set: Qwen2-VL's smart resize) round each side to the nearest whole cell and
    scale the image into [min_pixels, max_pixels]. Decoding straight to that box means the
    projector's own preprocessing has nothing left to resize, and never to more pixels than
    it would keep.
    """

    max_side: int
    multiple: int = 1
    max_cells: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.max_side < 1:
            raise ValueError(f"max_side must be positive, got {self.max_side}")
        if self.multiple < 1 or (self.max_cells is not None and self.max_cells < 1):
            raise ValueError(f"multiple and max_cells must be positive: {self}")
        if self.max_pixels is not None and self.max_pixels < self.multiple ** 2:
            raise ValueError(f"max_pixels must hold at least one cell: {self}")

    @classmethod
    def from_info(cls, info: dict[str, Any], default_side: int, detail: str = "auto"
                  ) -> SizeRule:
        """The rule the engine's model info describes (server.engine.model: image_*), for
        an image's `detail` (`low`, `high`; anything else: the default)."""
        info = (info.get("image_detail") or {}).get(detail) or info
        return cls(int(info.get("image_target_side") or default_side),
                   int(info.get("image_cell") or 1), info.get("image_max_tokens"),
                   info.get("projector_min_pixels"), info.get("projector_max_pixels"))

    def box(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) to decode a width x height image to."""
        if self.max_pixels is not None:
            # The config's cap first (mtmd never sees more), then the projector's own rule.
            m = self.multiple  # the cap in whole cells, so rounding to the nearest stays in it
            box = target_size(width, height, max(m, self.max_side // m * m))
            for _ in range(8):
                # A fixed point, so mtmd keeps it as it is. Only extreme aspect ratios need more
                # passes: their short side is raised to one cell after the max_pixels
                # shrink, which leaves them over max_pixels, so mtmd would shrink them again.
                again = smart_resize(*box, self.multiple, self.min_pixels or 0, self.max_pixels)
                if again == box:
                    break
                box = again
            return box
        if self.multiple == 1 and self.max_cells is None:
            return target_size(width, height, self.max_side)
        cols, rows = self.grid(width, height)
        return cols * self.multiple, rows * self.multiple

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(columns, rows) of cells the image becomes."""
        if width < 1 or height < 1:
            raise ValueError(f"invalid image size {width}x{height}")
        m = self.multiple
        cap = max(1, self.max_side // m)  # cells along the longest side
        landscape = width >= height
        long, short = (width, height) if landscape else (height, width)
        if long <= cap * m:  # no downscaling: each side rounded up to whole cells
            n_long, n_short = _ceil_div(long, m), _ceil_div(short, m)
        else:  # longest side scaled to exactly `cap` cells, the other in proportion
            n_long, n_short = cap, max(1, _ceil_div(short * cap, long))
        if self.max_cells is not None and n_long * n_short > self.max_cells:
            n_long, n_short = _fit(long, short, n_long, n_short, self.max_cells)
        return (n_long, n_short) if landscape else (n_short, n_long)


def _fit(long: int, short: int, n_long: int, n_short: int, budget: int) -> tuple[int, int]:
    """The grid of the largest scale (at most the unbudgeted one) within `budget` cells.

    A scale that gives the long side n cells lies in ((n-1)/long, n/long] (in cells per
    pixel), where the short side takes every count from just above short*(n-1)/long up to
    ceil(short*n/long); so, from the top, take the first n with a count that fits.
    """
    for n in range(n_long, 0, -1):
        most = n_short if n == n_long else _ceil_div(short * n, long)
        most = min(most, budget // n)
        if most >= max(1, short * (n - 1) // long + 1):
            return n, most
    return 1, 1


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longest side is max_side; never enlarged."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, min(max_side, round(width * scale))), max(1, min(max_side, round(height * scale)))


def smart_resize(width: int, height: int, factor: int, min_pixels: int, max_pixels: int
                 ) -> tuple[int, int]:
    """mtmd's calc_size_preserved_ratio (tools/mtmd/mtmd-image.cpp), in its float32 arithmetic
    so that the box is the one mtmd computes: each side rounded to the nearest multiple of
    `factor` (at least one), then scaled down into `max_pixels` (rounding down) or up to
    `min_pixels` (rounding up). Applied to its own output it changes nothing, which is what
    lets mtmd copy a decoded image instead of resizing it again."""
    f32 = np.float32
    f = f32(factor)

    def by(x: np.float32, rounding: Any) -> int:
        return int(rounding(float(f32(x) / f))) * factor

    def nearest(v: float) -> int:
        return math.floor(v + 0.5)  # std::round: half away from zero (v >= 0 here)

    w_bar = max(factor, by(f32(width), nearest))
    h_bar = max(factor, by(f32(height), nearest))
    if max_pixels > 0 and w_bar * h_bar > max_pixels:
        beta = np.sqrt(f32(height) * f32(width) / f32(max_pixels))
        h_bar = max(factor, by(f32(height) / beta, math.floor))
        w_bar = max(factor, by(f32(width) / beta, math.floor))
    elif min_pixels > 0 and w_bar * h_bar < min_pixels:
        beta = np.sqrt(f32(min_pixels) / (f32(height) * f32(width)))
        h_bar = by(f32(height) * beta, math.ceil)
        w_bar = by(f32(width) * beta, math.ceil)
    return w_bar, h_bar


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
