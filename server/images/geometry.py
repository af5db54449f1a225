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


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
