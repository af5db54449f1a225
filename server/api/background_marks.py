"""Stops asked of a background response on a replica that does not run it (a shared store
only): the cancel or DELETE leaves a small mark in the store, and the replica running the
response looks for marks on its runs every MARK_POLL_S and stops the run as if the
request had come to it. Without marks it would only find out when it next wrote the
response (at admission and at the end), generating to the end meanwhile.

A mark is tiny and read by key, so looking costs one small Redis call per running
response; marks expire on their own (MARK_TTL_S), a run's end does not clear them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Literal

from server.api.background import BackgroundRun
from server.store import Bounds, Codec, StateBackend, StateUnavailable, Table

logger = logging.getLogger("vlserve.api")

Stop = Literal["cancelled", "deleted"]
MARK_POLL_S = 0.5  # how soon a cancel elsewhere stops the generation
MARK_TTL_S = 86400.0  # longer than any run waits and generates
_MAX_MARKS = 100_000  # ~100 bytes each: the oldest go first past this
_BOUNDS = Bounds(_MAX_MARKS, _MAX_MARKS * 128, MARK_TTL_S, _MAX_MARKS, _MAX_MARKS * 128,
                 evict_others=True)
_CODEC: Codec[str] = Codec(lambda stop: (stop.encode(), b""),
                           lambda head, _: head.decode())


class StopMarks:
    """The marks table; with a single-process store there is no other replica to mark
    for (every run is this process's own), and every call is a no-op."""

    def __init__(self, backend: StateBackend) -> None:
        self._table: Table[str] | None = (
            backend.table("background_stops", _BOUNDS, _CODEC) if backend.shared else None)

    async def mark(self, response_id: str, owner: str, stop: Stop) -> None:
        """Ask whichever replica runs `response_id` to stop it (StateUnavailable when the
        store is out of reach: the caller's request fails with a 503, as its other writes)."""
        if self._table is not None:
            await self._table.put(owner, response_id, stop, len(stop))

    async def watch(self, run: BackgroundRun) -> None:
        """Until cancelled (at the run's end): stop `run` once a mark for it appears."""
        if self._table is None:
            return
        while not run.ended and run.stop_reason is None:
            await asyncio.sleep(MARK_POLL_S)
            try:
                stop = await self._table.get(run.owner, run.response_id)
            except StateUnavailable as exc:  # looked for again at the next tick
                logger.warning("background response %s: stop marks unreadable: %s",
                               run.response_id, exc)
                continue
            if stop is None:
                continue
            logger.info("background response %s: %s on another replica", run.response_id,
                        stop)
            if stop == "deleted":
                run.deleted = True  # nothing of it is written again
            run.stop("cancelled")

    @staticmethod
    async def stop_watching(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
