"""The batches the API shows: this replica's own objects, or the shared store's.

On one box the runner holds every batch. On a shared store it holds only the ones it runs
(their counts are the freshest); the others are read from Redis, where their holders keep
them current (each status change, and request_counts once a tick).
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.batches.job import TERMINAL, order_key
from server.batches.redis_store import RedisBatchStore
from server.batches.runner import BatchRunner


async def find(runner: BatchRunner, batch_id: str, owner: str) -> dict[str, Any] | None:
    """The owner's batch, or None."""
    store = runner.store
    if not isinstance(store, RedisBatchStore) or batch_id in runner.jobs:
        return runner.get(batch_id, owner)
    batch = await asyncio.to_thread(store.load_batch, batch_id)
    return batch if batch is not None and batch.get("_owner") == owner else None


async def owned(runner: BatchRunner, owner: str) -> list[dict[str, Any]]:
    """The owner's batches, newest first (a total order: time, then id)."""
    store = runner.store
    if not isinstance(store, RedisBatchStore):
        return runner.list(owner)
    mine = {b["id"]: b for b in await asyncio.to_thread(store.list_batches, owner)}
    mine.update((job.id, job.batch) for job in runner.jobs.values() if job.owner == owner)
    return sorted(mine.values(), key=order_key, reverse=True)


async def inputs_in_use(runner: BatchRunner) -> set[str]:
    """The input files of batches not finished yet, on any replica: their bytes must stay
    until those batches end, whatever happens to the files' records."""
    store = runner.store
    if not isinstance(store, RedisBatchStore):  # the runner holds every unfinished batch
        return {job.batch["input_file_id"] for job in runner.jobs.values()}
    return {b["input_file_id"] for b in await asyncio.to_thread(
        lambda: list(store.load_batches()))}


async def open_count(runner: BatchRunner, owner: str) -> int:
    """How many of the owner's batches have not ended yet, on any replica."""
    store = runner.store
    if not isinstance(store, RedisBatchStore):  # the runner holds every unfinished batch
        # By status, as the client sees it: a job stays in the runner a moment after its
        # batch ended (writing its files), and a client told "cancelled" may create the next.
        return sum(1 for job in runner.jobs.values()
                   if job.owner == owner and job.batch["status"] not in TERMINAL)
    return await asyncio.to_thread(store.open_count, owner)

