"""Keeps the tables in the state snapshot (server.store.snapshot) while the server runs:
claims the file and reads it back at the start, then writes it every `interval_s`, in a
worker thread, only when a table changed since the last write, and once more at a
graceful stop. One write at a time: the last one at the stop waits for a periodic one
still under way (they share the `.part` file).

A file another server holds (the old one of a deploy, still draining on it) is claimed
again every CLAIM_RETRY_S: once that server has stopped, what it wrote last is read into
the tables this one has been filling meanwhile (its own entries win) and kept from then
on. Until then this server neither writes the file nor notes deletes in its journal: both
are the other server's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from server.store.deletions import DeletionJournal
from server.store.snapshot import Tables, claim, discard, load, save

logger = logging.getLogger("vlserve.store")

# How often a server without the file tries to claim it: one open and one non-blocking
# flock, so cheap; and it bounds both how long the other server's last entries stay
# unknown here after it stopped and how long what this one stored goes unkept.
CLAIM_RETRY_S = 1.0


class SnapshotWriter:
    def __init__(self, path: Path, tables: Tables, interval_s: float,
                 report: Callable[[bool], None] = lambda written: None,
                 interrupted: Callable[[Tables], int] = lambda tables: 0) -> None:
        self.path = path
        self.tables = tables
        self.interval_s = interval_s
        self.report = report  # each write's outcome (metrics): True written, False failed
        # Ends what the snapshot's process left running (its background responses, gone
        # with it) in the tables read from it; the number ended.
        self.interrupted = interrupted
        self.held = False  # the file claimed: only then is it read, written, journaled
        self._lock = threading.Lock()
        self._written: tuple[int, ...] | None = None  # the tables' changes at the last write
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.deletions = DeletionJournal(path)  # deletes between writes survive a crash

    def write(self, *, force: bool = False) -> int | None:
        """Write the tables unless nothing changed since the last write (or `force`): the
        entries written, None when skipped. The caller holds the file."""
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

    async def open(self) -> None:
        """At the start, before serving: claim the file and read it back; one another
        server holds is claimed again from `start` on."""
        if not await asyncio.to_thread(self._take):
            logger.warning("state snapshot %s is held by another server (one still "
                           "draining?): nothing is kept in it until that one lets it go; "
                           "claimed again every %g s", self.path, CLAIM_RETRY_S)

    def start(self) -> None:
        """Once serving: write now (what the start restored: the file then holds only
        that) and then every interval; or, the file held elsewhere, first wait for it."""
        self._task = asyncio.create_task(self._run(), name="state snapshot")

    def _take(self) -> bool:
        """Claim the file and, the first time, read it into the tables; False while
        another server holds it."""
        with self._lock:  # a write at the stop waits for a read under way
            if self.held:
                return True
            if not claim(self.path):
                return False
            self.held = True
            if self.interval_s > 0:  # first: a delete while it is read is noted too
                self.deletions.watch(self.tables)
            self._adopt()
            return True

    def _adopt(self) -> None:
        """Read the file into the tables, which may be in use already (a server that
        waited for it): read into empty tables first, its deletes journal applied, then
        merged in, this server's own entries winning. A failure is logged: the server
        goes on without it."""
        try:
            staged = {name: (table.empty(), codec)
                      for name, (table, codec) in self.tables.items()}
            loaded, skipped = load(self.path, staged)
            # Deleted after the snapshot's write and before a crash: deleted again. Only
            # its own entries: this server's keys are random ids it made itself.
            undone = self.deletions.replay(staged)
            failed = self.interrupted(staged)
            restored = sum(table.absorb(staged[name][0])
                           for name, (table, _) in self.tables.items())
        except Exception:
            logger.exception("state snapshot %s not read", self.path)
            return
        skipped += loaded - undone - restored  # held here already, or no room beside ours
        logger.info("state snapshot %s: %d entries restored, %d skipped, %d deleted again "
                    "(deleted after its last write), %d unfinished background responses "
                    "marked failed", self.path, restored, skipped, undone, failed)

    async def _run(self) -> None:
        if not self.held:
            while not await asyncio.to_thread(self._take):
                await asyncio.sleep(CLAIM_RETRY_S)
            logger.info("state snapshot %s claimed (the server that held it let it go): "
                        "kept from now on", self.path)
        if self.interval_s <= 0:  # only at the stop: a crash must not bring back deletes
            discard(self.path)
            return
        logger.info("state snapshot %s: written every %g s while it changes, and at a "
                    "graceful stop", self.path, self.interval_s)
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
            if not await asyncio.to_thread(self._take):
                logger.error("state snapshot %s not written: another server still holds "
                             "it (what this one stored is lost)", self.path)
                return
            saved = await asyncio.to_thread(self.write, force=True)
            logger.info("state snapshot %s: %d entries written", self.path, saved)
        except Exception:  # a full disk: the rest of the shutdown goes on
            logger.exception("state snapshot %s not written", self.path)
