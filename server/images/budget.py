"""One process-wide budget for the memory of image decodes in flight.

A decode reserves its estimated peak (server.images.cost) before it starts and gives it back
when its thread has finished, even if the request that asked for it was cancelled meanwhile.
Decodes that would go over the budget wait their turn, first come first served, on the
event loop (an await, never a blocked thread).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class DecodeBudget:
    def __init__(self, total_bytes: int) -> None:
        if total_bytes < 1:
            raise ValueError("the decode budget must be positive")
        self.total_bytes = total_bytes
        self.in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def run(self, n_bytes: int, fn: Callable[[], T]) -> T:
        """Run `fn` in a worker thread once `n_bytes` fit in the budget.

        A reservation larger than the whole budget is capped at it (it then runs alone), so
        no caller can wait forever.
        """
        n_bytes = min(max(n_bytes, 0), self.total_bytes)
        await self._acquire(n_bytes)
        try:
            future = asyncio.get_running_loop().run_in_executor(None, fn)
        except BaseException:
            self._release(n_bytes)
            raise
        future.add_done_callback(lambda _: self._release(n_bytes))
        # Shielded: a cancelled request stops waiting, but the memory stays reserved until
        # the thread, which cannot be stopped, has really finished with it.
        return await asyncio.shield(future)

    async def _acquire(self, n_bytes: int) -> None:
        if not self._waiters and self.in_use + n_bytes <= self.total_bytes:
            self.in_use += n_bytes
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n_bytes, granted)
        self._waiters.append(entry)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release(n_bytes)  # granted just as the caller went away
            else:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._wake()  # the head may have changed
            raise

    def _release(self, n_bytes: int) -> None:
        self.in_use -= n_bytes
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use + self._waiters[0][0] <= self.total_bytes:
            n_bytes, granted = self._waiters.popleft()
            if granted.done():  # cancelled while queued
                continue
            self.in_use += n_bytes
            granted.set_result(None)
