"""What a decode step costs by the number of positions (with logits) in it, measured once
at warm-up: how long predicted drafts should be depends on it (server/engine/prediction.py).

The cost is far from linear and differs by device: on 2 CPU cores with Gemma 3 270M, 2 and
3 positions cost 2× and 3× one (one matrix-vector product per row), 9 cost 4.8× and 17 7.1×
(batched kernels take over from 4 rows); on a GPU a few more rows cost almost nothing.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass

import llama_cpp

from server.engine.batch import TokenBatch

REPEATS = 3  # the fastest of these per size: the others met a busy core


@dataclass(frozen=True)
class StepCosts:
    """Seconds a step of `sizes[i]` positions took, ascending sizes from 1 (at least two),
    seconds never falling; between measured sizes linear, beyond the last growing at the
    last stretch's rate."""

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]

    def of(self, positions: int) -> float:
        sizes, seconds = self.sizes, self.seconds
        i = bisect_left(sizes, positions)
        if i < len(sizes) and sizes[i] == positions:
            return seconds[i]
        if i == 0:
            return seconds[0]
        hi = min(i, len(sizes) - 1)
        lo = hi - 1
        slope = (seconds[hi] - seconds[lo]) / (sizes[hi] - sizes[lo])
        return seconds[lo] + slope * (positions - sizes[lo])

    def extra(self, base: int, more: int) -> float:
        """A step of `base` positions with `more` added, relative to it."""
        return self.of(base + more) / self.of(base)


def steady(sizes: list[int], seconds: list[float]) -> StepCosts:
    """Costs as measured, made never to fall with more positions. A busy core only makes a
    step slower, so where a smaller step measured slower than a larger one, the smaller is
    the inflated one: it takes the larger's time (the least of its own and every larger
    one's), rather than passing its inflation on to all larger sizes."""
    steady_seconds = [min(seconds[i:]) for i in range(len(seconds))]
    return StepCosts(tuple(sizes), tuple(steady_seconds))


def linear(position_cost: float, largest: int) -> StepCosts:
    """Costs assumed, not measured: each position adds `position_cost` of a step of one."""
    largest = max(2, largest)
    return StepCosts((1, largest), (1.0, 1.0 + position_cost * (largest - 1)))


def measure(ctx: llama_cpp.llama_context_p, batch: TokenBatch, seq_id: int, start: int,
            largest: int, token: int) -> StepCosts:
    """Time steps of 1, 2, 3, 4, 8, ... `largest` positions of `token` on `seq_id` from
    position `start`, each taken back out of the KV cache after it. Every size up to 4 is
    measured: those are the drafts a stream's bound allows beside another, and on a CPU 3
    costs a whole step more than halfway between 2 and 4."""
    memory = llama_cpp.llama_get_memory(ctx)
    sizes = list(range(1, min(4, largest) + 1))
    while sizes[-1] < largest:
        sizes.append(min(largest, sizes[-1] * 2))
    best = dict.fromkeys(sizes, float("inf"))
    for _ in range(REPEATS):
        for size in sizes:
            batch.clear()
            for j in range(size):
                batch.add(token, start + j, seq_id, True)
            t0 = time.perf_counter()
            ret = batch.decode(ctx)
            elapsed = time.perf_counter() - t0
            llama_cpp.llama_memory_seq_rm(memory, seq_id, start, -1)
            if ret != 0:
                raise RuntimeError(f"llama_decode failed ({ret}) measuring a step of {size}")
            best[size] = min(best[size], elapsed)
    return steady(sizes, [best[s] for s in sizes])
