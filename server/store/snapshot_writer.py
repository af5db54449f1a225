"""Writes the state snapshot (server.store.snapshot) while the server runs: every
`interval_s`, in a worker thread, only when a table changed since the last write, and once
more at a graceful stop. One write at a time: the last one at the stop waits for a periodic
one still under way (they share the `.part` file)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from server.store.deletions import DeletionJournal
from server.store.snapshot import Tables, save

logger = logging.getLogger("vlserve.store")


class SnapshotWriter:
    def __init__(self, path: Path, tables: Tables, interval_s: float,
                 report: Callable[[bool], None] = lambda written: None) -> None:
        self.path = path
        self.tables = tables
        self.interval_s = interval_s
        self.report = report  # each write's outcome (metrics): True written, False failed
        self._lock = threading.Lock()
        self._written: tuple[int, ...] | None = None  # the tables' changes at the last write
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.deletions = DeletionJournal(path)  # deletes between writes survive a crash

    def write(self, *, force: bool = False) -> int | None:
        """Write the tables unless nothing changed since the last write (or `force`): the
        entries written, None when skipped."""
        with self._lock:
            # Read before the write: a change during it is written again next time.
            seen = tuple(table.changes for table, _ in self.tables.values())
            if not force and seen == self._written:
                return None
            noted = self.deletions.length()  # the tables are read after: these are in
            try:
                written = save(self.path, self.tables)
            except Exception:
                self.report(False)
                raise
            self._written = seen
            self.report(True)
            try:  # under the writer's lock: two trims out of order would drop new lines
                self.deletions.forget(noted)
            except OSError as exc:  # kept whole: replaying it again is harmless
                logger.warning("state snapshot: deletes journal not trimmed (%s)", exc)
        return written

    def start(self) -> None:
        """Write now (what the start restored: the file then holds only that) and then
        every interval."""
        self.deletions.watch(self.tables)
        self._task = asyncio.create_task(self._run(), name="state snapshot")
        logger.info("state snapshot %s: written every %g s while it changes, and at a "
                    "graceful stop", self.path, self.interval_s)

    async def _run(self) -> None:
        while True:
            try:
                written = await asyncio.to_thread(self.write)
                if written is not None:
                    logger.debug("state snapshot %s: %d entries written", self.path, written)
                if self._failing:
                    logger.info("state snapshot %s written again", self.path)
                self._failing = False
            except Exception as exc:  # a full disk: retried next interval, logged once
                if not self._failing:
                    logger.error("state snapshot %s not written (%s: %s); retried every "
                                 "%g s", self.path, type(exc).__name__, exc, self.interval_s)
                self._failing = True
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        """At a graceful stop (after the background runs' ends): the periodic writes end
        and the last write is made. A failure is logged, the shutdown goes on."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            saved = await asyncio.to_thread(self.write, force=True)
            logger.info("state snapshot %s: %d entries written", self.path, saved)
        except Exception:  # a full disk: the rest of the shutdown goes on
            logger.exception("state snapshot %s not written", self.path)
