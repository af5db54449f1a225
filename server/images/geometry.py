"""The pixel size an image is decoded to, from limits stated in the projector's own terms."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SizeRule:
    """Longest side at most `max_side`; with `multiple` > 1, also a grid of whole cells.

    Grid projectors (a ViT whose tokens each cover multiple x multiple pixels) round every
    side up to whole cells and shrink images over `max_cells` cells. Decoding straight to that
    grid means the projector's own preprocessing has nothing left to resize, and never to
    more pixels than it would keep.
    """

    max_side: int
    multiple: int = 1
    max_cells: int | None = None

    def __post_init__(self) -> None:
        if self.max_side < 1:
            raise ValueError(f"max_side must be positive, got {self.max_side}")
        if self.multiple < 1 or (self.max_cells is not None and self.max_cells < 1):
            raise ValueError(f"multiple and max_cells must be positive: {self}")

    def box(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) to decode a width x height image to."""
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
        if self.max_cells is not None:
            # Too many cells: the largest scale that fits, one cell of the long side at a time.
            while n_long * n_short > self.max_cells and n_long > 1:
                n_long -= 1
                n_short = max(1, _ceil_div(short * n_long, long))
            n_short = min(n_short, self.max_cells // n_long)
        return (n_long, n_short) if landscape else (n_short, n_long)


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longest side is max_side; never enlarged."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, min(max_side, round(width * scale))), max(1, min(max_side, round(height * scale)))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
