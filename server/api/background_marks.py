"""Stops asked of a background response on a replica that does not run it (a shared store
only): the cancel or DELETE first leaves a small mark in the store (so a mark that could
not be written fails the request before anything changed, and a retry can do it again),
and the replica running the response stops the run as if the request had come to it.
Without marks it would only find out when it next wrote the response (at admission and at
the end), generating to the end meanwhile, and would write a deleted response back.

Each mark also moves a version entry: a replica with runs going reads that one small
entry every MARK_POLL_S and reads its runs' marks only when it moved, so the cost is one
Redis call per tick however many runs wait. Marks expire on their own (MARK_TTL_S)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Literal

from server.api.background import BackgroundRun, BackgroundRuns
from server.store import Bounds, Codec, StateBackend, StateUnavailable, Table

logger = logging.getLogger("vlserve.api")

Stop = Literal["cancelled", "deleted"]
MARK_POLL_S = 0.5  # how soon a cancel elsewhere stops the generation
MARK_TTL_S = 3600.0  # a replica running the response sees it within a tick
_MAX_MARKS = 100_000  # ~100 bytes each: the oldest go first past this
_BOUNDS = Bounds(_MAX_MARKS, _MAX_MARKS * 128, MARK_TTL_S, _MAX_MARKS, _MAX_MARKS * 128,
                 evict_others=True)
_CODEC: Codec[str] = Codec(lambda stop: (stop.encode(), b""),
                           lambda head, _: head.decode())
_VERSION = ("*", "version")  # owner and key of the entry every mark moves


class StopMarks:
    """The marks table; with a single-process store there is no other replica to mark
    for (every run is this process's own), and every call is a no-op."""

    def __init__(self, backend: StateBackend) -> None:
        self._table: Table[str] | None = (
            backend.table("background_stops", _BOUNDS, _CODEC) if backend.shared else None)
        self._version_seen: str | None = None

    async def mark(self, response_id: str, owner: str, stop: Stop) -> None:
        """Ask whichever replica runs `owner`'s `response_id` to stop it (StateUnavailable
        when the store is out of reach: the caller's request fails with a 503 before it
        changed anything). Keyed by owner too: another key's DELETE of the same id (a 404
        for it) cannot replace the owner's mark."""
        if self._table is not None:
            await self._table.put(owner, _key(owner, response_id), stop, len(stop))
            await self._table.put(*_VERSION, secrets.token_hex(8), 16)

    async def read(self, run: BackgroundRun) -> Stop | None:
        """The mark left for `run`, if any (StateUnavailable: the store out of reach)."""
        if self._table is None:
            return None
        stop = await self._table.get(run.owner, _key(run.owner, run.response_id))
        return stop if stop in ("cancelled", "deleted") else None  # type: ignore[return-value]

    async def watch(self, runs: BackgroundRuns) -> None:
        """Until cancelled (at shutdown): stop this replica's runs that another replica
        marked."""
        if self._table is None:
            return
        while True:
            await asyncio.sleep(MARK_POLL_S)
            active = runs.running_now()
            if not active:
                continue
            try:
                version = await self._table.get(*_VERSION)
                if version == self._version_seen:
                    continue
                for run in active:
                    stop = await self.read(run)
                    if stop is not None:
                        apply(run, stop)
                self._version_seen = version  # only once every run's mark was read
            except StateUnavailable as exc:  # looked for again at the next tick
                logger.warning("background stop marks unreadable: %s", exc)
            except Exception:  # a bug: marks stop working, the runs go on
                logger.exception("background stop marks")


def _key(owner: str, response_id: str) -> str:
    return f"{owner}/{response_id}"


def apply(run: BackgroundRun, stop: Stop) -> None:
    """Stop `run` as a cancel (or a DELETE) sent here would."""
    if run.stop_reason is None and not run.ended:
        logger.info("background response %s: %s on another replica", run.response_id, stop)
    if stop == "deleted":
        run.deleted = True  # nothing of it is written again
    run.stop("cancelled")
