"""Which replica runs which batch, on a shared store: one lease per batch in Redis.

A runner claims an unfinished batch nobody holds (SET NX PX: the lease lasts
`batch_lease_s`), and renews its leases every third of that on a task of its own, so a
long load or a busy loop never lets one lapse. A replica that dies stops renewing: after
the TTL another replica's claim succeeds and it resumes the batch from its results log.
A renewal that finds the lease gone or someone else's reports the batch lost: the runner
stops its lines there (and the store's fenced writes refuse anything they still send).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from server.batches.job import TERMINAL
from server.batches.redis_store import RedisBatchStore

logger = logging.getLogger("vlserve.batches")


class Leases:
    def __init__(self, store: RedisBatchStore, ttl_s: float,
                 on_lost: Callable[[str], None]) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.held: set[str] = set()
        self._on_lost = on_lost
        self._task: asyncio.Task[None] | None = None
        self._next_scan = 0.0  # monotonic: the runner wakes per finished line, scans per tick

    def start(self) -> None:
        self._task = asyncio.create_task(self._renew_loop())

    async def stop(self) -> None:
        """Stop renewing and hand every lease back: another replica takes the batches over
        on its next tick instead of after the TTL."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for batch_id in sorted(self.held):
            with contextlib.suppress(Exception):  # Redis gone: the TTL frees them anyway
                await asyncio.to_thread(self.store.release, batch_id)
        self.held.clear()

    async def claim(self, running: set[str], every_s: float) -> list[dict[str, Any]]:
        """Claim every unfinished batch that no replica holds (at most once per `every_s`);
        their records, claimed."""
        if time.monotonic() < self._next_scan:
            return []
        self._next_scan = time.monotonic() + every_s
        claimed = []
        for batch in await asyncio.to_thread(lambda: list(self.store.load_batches())):
            batch_id = batch["id"]
            if batch_id in running or batch["status"] in TERMINAL:
                continue
            if not await asyncio.to_thread(self.store.claim, batch_id, self.ttl_s):
                continue  # another replica runs it
            # Re-read under the lease: the last holder may have finished it meanwhile.
            fresh = await asyncio.to_thread(self.store.load_batch, batch_id)
            if fresh is None or fresh["status"] in TERMINAL:
                await asyncio.to_thread(self.store.release, batch_id)
                continue
            self.held.add(batch_id)
            claimed.append(fresh)
        return claimed

    async def release(self, batch_id: str) -> None:
        self.held.discard(batch_id)
        await asyncio.to_thread(self.store.release, batch_id)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            held = sorted(self.held)
            try:
                lost = await asyncio.to_thread(self.store.renew, held, self.ttl_s)
            except Exception:  # Redis away: keep trying; the fenced writes guard the rest
                logger.exception("batch leases could not be renewed")
                continue
            for batch_id in lost:
                if batch_id in self.held:
                    self.held.discard(batch_id)
                    self._on_lost(batch_id)
