"""Runs batches: validates them, feeds their lines to the engine, finalizes them.

One asyncio task on the server's event loop. It keeps at most `batch_in_flight` lines
(by default one per slot and one waiting) in the engine at batch priority, so batch work
fills the slots interactive requests leave idle and steps aside when they need one (the
engine preempts it; see server/engine/admission.py). Each finished line is appended to
the batch's results log on disk before it counts as done, so a restart runs only what has
no result yet.

On a shared store (Redis, server/batches/redis_store.py) every replica's runner claims the
unfinished batches nobody holds (server/batches/leases.py) and runs only those; reads of
other batches and cancels of them go through the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp

from server.api.state import AppState
from server.batches import images
from server.batches import lines as batch_lines
from server.batches.call import call
from server.batches.job import (
    TERMINAL,
    BatchJob,
    order_key,
    public,
    result_line,
    set_status,
    succeeded,
)
from server.batches.leases import Leases
from server.batches.redis_store import BatchStorage, LeaseLost, RedisBatchStore
from server.engine.types import BATCH_PRIORITY
from server.store import StateUnavailable

logger = logging.getLogger("vlserve.batches")

# Answers that say "not now" rather than "no": the line runs again later, nothing recorded.
_RETRY = {429: 1.0, 499: 0.0, 503: 2.0}
_TICK_S = 1.0  # how often expiry and drain are checked while nothing else happens
_SWEEP_MAX_S = 300.0  # expired files and old batches are deleted at least this often
# A batch whose step keeps raising waits 1, 2, 4, 8 s between tries, then ends failed
# (one ending already, whose files cannot be written, is tried again every _MAX_WAIT_S).
_GIVE_UP_AFTER = 5
_MAX_WAIT_S = 30.0


class BatchRunner:
    def __init__(self, app: ASGIApp, state: AppState, store: BatchStorage) -> None:
        self.app = app
        self.state = state
        self.store = store
        self.batches: dict[str, dict[str, Any]] = {}  # every batch object, by id
        self.jobs: dict[str, BatchJob] = {}  # the unfinished ones
        # Held from a key's open-batch count to the add that follows: creates at once
        # cannot all pass batch_max_open_per_key (on this replica; replicas may pass it by
        # the creates they take at the same instant).
        self.creating = asyncio.Lock()
        self.in_flight = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._lines: set[asyncio.Task[None]] = set()
        self._version = itertools.count(1)
        # Shared store: the batches this replica runs are the ones it holds a lease on.
        self.leases = (Leases(store, state.settings.batch_lease_s, self._lost)
                       if isinstance(store, RedisBatchStore) else None)
        self._published: dict[str, dict[str, int]] = {}  # request_counts last saved
        self._next_publish = 0.0  # monotonic; at most once a tick
        self._next_sweep = 0.0  # monotonic
        # Batches whose last step raised: consecutive failures, and when to try again.
        self._trouble: dict[str, tuple[int, float]] = {}

    @property
    def limit(self) -> int:
        settings = self.state.settings
        # One more than the slots: a line waits in the queue for the next free slot, so no
        # slot idles while the runner records a finished line and starts the next.
        return settings.batch_in_flight or settings.n_parallel + 1

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Load every batch on disk; unfinished ones carry on where they stopped. On a
        shared store the loop claims them instead, tick by tick."""
        if self.leases is not None:
            self.leases.start()
        on_disk = [] if self.leases is not None else await asyncio.to_thread(
            lambda: list(self.store.load_batches()))
        for batch in on_disk:
            self.batches[batch["id"]] = batch
            if batch["status"] not in TERMINAL:
                self.jobs[batch["id"]] = BatchJob(batch)
                logger.info("batch %s resumes (%s)", batch["id"], batch["status"])
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop launching, then hang up on the lines in the engine (they run again after a
        restart) and give them a moment to record nothing and end."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self.jobs.values():
            for cancel in job.running.values():
                cancel.set()
        if self._lines:
            await asyncio.wait(self._lines, timeout=10)
        if self.leases is not None:
            await self.leases.stop()

    async def _save(self, batch: dict[str, Any]) -> None:
        """Snapshot on the loop (nothing changes it meanwhile), write on a worker thread;
        the version keeps a slower older write from replacing a newer one."""
        data = json.dumps(batch).encode()
        try:
            await asyncio.to_thread(self.store.save_batch, batch["id"], data,
                                    next(self._version))
        except LeaseLost:
            self._lost(batch["id"])
            raise

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # --- API -----------------------------------------------------------------------------
    async def add(self, batch: dict[str, Any]) -> dict[str, Any]:
        await self._save(batch)
        if self.leases is None:  # shared: the first replica to claim it runs it
            self.batches[batch["id"]] = batch
            self.jobs[batch["id"]] = BatchJob(batch)
        logger.info("batch %s created: input %s, window %s", batch["id"],
                    batch["input_file_id"], batch["completion_window"])
        self.wake()
        return public(batch)

    def get(self, batch_id: str, owner: str) -> dict[str, Any] | None:
        batch = self.batches.get(batch_id)
        return batch if batch is not None and batch.get("_owner") == owner else None

    def list(self, owner: str) -> list[dict[str, Any]]:
        """The owner's batches, newest first (a total order: time, then id)."""
        mine = [b for b in self.batches.values() if b.get("_owner") == owner]
        return sorted(mine, key=order_key, reverse=True)

    async def cancel(self, batch: dict[str, Any]) -> None:
        job = self.jobs.get(batch["id"])
        if job is None and isinstance(self.store, RedisBatchStore):
            # Run elsewhere (or not claimed yet): the holder sees the request on its tick.
            if batch["status"] in ("validating", "in_progress") and await asyncio.to_thread(
                    self.store.request_cancel, batch["id"]):
                set_status(batch, "cancelling")
                logger.info("batch %s: cancel asked; its holder stops it", batch["id"])
            return
        if job is None or batch["status"] not in ("validating", "in_progress"):
            return
        set_status(batch, "cancelling")
        await self._save(batch)
        for cancel in job.running.values():
            cancel.set()
        logger.info("batch %s cancelling (%d lines running)", job.id, len(job.running))
        self.wake()

    def statuses(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for batch in self.batches.values():
            counts[batch["status"]] = counts.get(batch["status"], 0) + 1
        return counts

    # --- the loop ------------------------------------------------------------------------
    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            try:
                await self._advance()
            except StateUnavailable as exc:  # Redis away: say so once a tick, no traceback
                logger.warning("the batch runner cannot reach the shared store: %s", exc)
            except Exception:  # one bad batch must not stop the others for good
                logger.exception("the batch runner failed; retrying shortly")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _TICK_S)

    async def _advance(self) -> None:
        if self.leases is not None:
            await self._shared_tick()
        if time.monotonic() >= self._next_sweep:
            await self._sweep()
        for job in sorted(self.jobs.values(), key=lambda j: order_key(j.batch)):
            if job.id not in self.jobs:
                continue  # lost to another replica during this pass
            failures, retry_at = self._trouble.get(job.id, (0, 0.0))
            if time.monotonic() < retry_at:
                continue
            try:
                await self._step(job)
            except LeaseLost:
                continue  # another replica runs it now; _lost stopped it here
            except StateUnavailable:
                raise  # the store is away for every batch, not this one's fault
            except Exception as exc:  # this batch alone: the others go on
                await self._stumbled(job, failures + 1, exc)
            else:
                self._trouble.pop(job.id, None)
        if self.state.drain.draining:
            for job in self.jobs.values():  # they run again after the restart
                for cancel in job.running.values():
                    cancel.set()
            return
        if not self.state.engine.ready:
            return
        self._launch()

    async def _step(self, job: BatchJob) -> None:
        if not job.lines:  # new, resumed after a restart, or claimed from another replica
            try:
                await self._load(job)
            except Exception as exc:
                if not _lasting(exc):  # a full disk, too many open files: tried again
                    job.lines = []  # loaded from the start on the next try
                    raise
                logger.exception("batch %s: its input could not be loaded", job.id)
                await self._end_broken(job, "the input file could not be read or parsed "
                                       f"({type(exc).__name__})")
                return
            if job.id not in self.jobs:
                return  # failed validation
        status = job.batch["status"]
        if status == "in_progress" and time.time() >= job.batch["expires_at"]:
            await self._begin_end(job, "expired")
        elif status == "in_progress" and job.all_done() and not job.running:
            await self._begin_end(job, "completed")
        if job.batch["status"] in ("cancelling", "finalizing") and not job.running:
            await self._finalize(job)

    async def _stumbled(self, job: BatchJob, failures: int, exc: Exception) -> None:
        """A step of this batch raised: try it again later, or end it after a few tries."""
        logger.error("batch %s: step failed (%d of %d tries)", job.id, failures,
                     _GIVE_UP_AFTER, exc_info=exc)
        wait_s = min(_MAX_WAIT_S, 2.0 ** (failures - 1))
        self._trouble[job.id] = (failures, time.monotonic() + wait_s)
        if failures < _GIVE_UP_AFTER or job.batch["status"] in ("finalizing", "cancelling"):
            # An ending batch has run what it will: only its files are left to write (a
            # full disk?). Given up, its results log would go with it: it is tried again.
            return
        if job.running:  # its lines stop first (_launch starts no more); it ends next try
            for cancel in job.running.values():
                cancel.set()
            return
        try:
            await self._end_broken(job, f"the batch failed {failures} times in a row "
                                   f"({type(exc).__name__}); it was stopped")
        except (LeaseLost, StateUnavailable):
            pass
        except Exception:  # ending it failed too (finalizing now): tried again later
            logger.exception("batch %s could not be ended", job.id)

    async def _end_broken(self, job: BatchJob, reason: str) -> None:
        """End a batch that cannot go on: failed with `reason` in its errors, or cancelled
        or expired if it was asked to or its window is over. What ran is kept."""
        batch = job.batch
        if batch["status"] in ("validating", "in_progress"):  # one ending keeps its end
            problem = batch_lines.FileProblem("batch_failed", reason)  # why, no traceback
            batch["errors"] = {"object": "list", "data": [problem.as_dict()]}
            batch["_final"] = "expired" if time.time() >= batch["expires_at"] else "failed"
            set_status(batch, "finalizing")
        # Raises if the files cannot be written: the batch stays finalizing and is tried
        # again (_stumbled); its results log goes only once they are written.
        await self._finalize(job)
        logger.warning("batch %s ended %s: %s", job.id, batch["status"], reason)

    async def _shared_tick(self) -> None:
        """Claim the batches nobody runs, act on cancels asked on other replicas, and
        publish progress (request_counts) for GETs elsewhere."""
        assert self.leases is not None and isinstance(self.store, RedisBatchStore)
        if self.state.engine.ready and not self.state.drain.draining:
            for batch in await self.leases.claim(set(self.jobs), _TICK_S):
                self.batches[batch["id"]] = batch
                self.jobs[batch["id"]] = BatchJob(batch)
                logger.info("batch %s claimed by %s (%s)", batch["id"], self.store.token,
                            batch["status"])
        asked = await asyncio.to_thread(self.store.cancels_requested, sorted(self.jobs))
        for job in [self.jobs[i] for i in sorted(asked) if i in self.jobs]:
            with contextlib.suppress(LeaseLost):
                await self.cancel(job.batch)
        if time.monotonic() < self._next_publish:
            return
        self._next_publish = time.monotonic() + _TICK_S
        for job in list(self.jobs.values()):
            counts = job.batch["request_counts"]
            if job.batch["status"] == "in_progress" and self._published.get(job.id) != counts:
                self._published[job.id] = dict(counts)
                with contextlib.suppress(LeaseLost):
                    await self._save(job.batch)

    async def _sweep(self) -> None:
        """Delete expired files and batches past their retention (a GET already misses an
        expired file; this frees its space). Inputs of unfinished batches are spared: a
        batch that outlives its input file's expiry must still resume after a restart."""
        settings = self.state.settings
        ttls = [t for t in (settings.batch_file_ttl_s, settings.batch_retention_s) if t]
        self._next_sweep = time.monotonic() + min([_SWEEP_MAX_S, *(t / 10 for t in ttls)])
        if self.leases is None:
            in_use = {job.batch["input_file_id"] for job in self.jobs.values()}
        else:  # every replica's unfinished batches
            in_use = {b["input_file_id"] for b in await asyncio.to_thread(
                lambda: list(self.store.load_batches()))}
        swept = await asyncio.to_thread(self.store.sweep, time.time(),
                                        settings.batch_retention_s, in_use)
        for batch_id in swept.batches:
            self.batches.pop(batch_id, None)
        if swept.files or swept.batches:
            logger.info("deleted %d expired batch files and %d batches past their retention",
                        len(swept.files), len(swept.batches))

    def _lost(self, batch_id: str) -> None:
        """Another replica holds the batch now: stop its lines here, forget it."""
        job = self.jobs.pop(batch_id, None)
        self.batches.pop(batch_id, None)
        self._trouble.pop(batch_id, None)
        self._published.pop(batch_id, None)
        if self.leases is not None:
            self.leases.held.discard(batch_id)
        if job is not None:
            for cancel in job.running.values():
                cancel.set()
            logger.warning("batch %s: its lease is held by another replica now; its %d "
                           "lines here stop", batch_id, len(job.running))

    def _launch(self) -> None:
        """Fill the free places one line at a time, each to the owner with the fewest lines
        in the engine, and within it to its batch with the fewest (ties: the oldest): a
        big batch never makes another key's small one wait for it to finish."""
        now = time.monotonic()
        # Not one whose steps fail: its lines are stopped before it is ended.
        ready = [job for job in sorted(self.jobs.values(), key=lambda j: order_key(j.batch))
                 if job.batch["status"] == "in_progress"
                 and self._trouble.get(job.id, (0, 0.0))[0] < _GIVE_UP_AFTER]
        owners: dict[str, int] = {}
        for job in self.jobs.values():
            owners[job.owner] = owners.get(job.owner, 0) + len(job.running)
        while self.in_flight < self.limit and ready:
            job = min(ready, key=lambda j: (owners[j.owner], len(j.running)))
            line = job.next_line(now)
            if line is None:  # nothing to run now (done, running or waiting to retry)
                ready.remove(job)
                continue
            cancel = asyncio.Event()
            job.running[line.index] = cancel
            owners[job.owner] += 1
            self.in_flight += 1
            task = asyncio.create_task(self._run_line(job, line, cancel))
            self._lines.add(task)
            task.add_done_callback(self._lines.discard)

    async def _run_line(self, job: BatchJob, line: batch_lines.RequestLine,
                        cancel: asyncio.Event) -> None:
        try:
            if line.body is None:
                result = result_line(line, None, None, None,
                                     {"code": "invalid_request", "message": line.error or ""})
            else:
                answer = await call(self.app, batch_lines.ENDPOINTS[job.batch["endpoint"]],
                                    line.body, owner=job.owner, priority=BATCH_PRIORITY,
                                    request_id=f"{job.id}:{line.index}", cancel=cancel,
                                    images=job.images)
                if answer.status in _RETRY:
                    job.retry(line, time.monotonic() + _RETRY[answer.status])
                    return
                result = result_line(line, answer.status, answer.body, answer.request_id)
            await asyncio.to_thread(self.store.append_result, job.id, result)
            job.record(result)
            self.state.metrics.batch_requests.labels(
                "completed" if succeeded(result) else "failed").inc()
        except LeaseLost:  # the store refused the answer: the new holder runs the line
            logger.info("batch %s line %d: answer dropped, another replica runs the batch",
                        job.id, line.index)
            self._lost(job.id)
        except Exception:
            logger.exception("batch %s line %d failed to run; it runs again", job.id,
                             line.index)
            job.retry(line, time.monotonic() + 5.0)
        finally:
            job.running.pop(line.index, None)
            self.in_flight -= 1
            self.wake()

    # --- status changes ------------------------------------------------------------------
    async def _load(self, job: BatchJob) -> None:
        """Parse the input (again, after a restart) and the results so far; a new batch
        goes in_progress, or failed if its file as a whole is invalid."""
        batch = job.batch
        settings = self.state.settings
        try:
            data = await asyncio.to_thread(self.store.file_bytes, batch["input_file_id"])
        except FileNotFoundError:  # deleted before the batch could (re)start
            lines, problems = [], [batch_lines.FileProblem(
                "invalid_file", f"the input file {batch['input_file_id']} was deleted")]
        else:  # 50,000 lines take most of a second: off the loop, which serves requests
            lines, problems = await asyncio.to_thread(batch_lines.parse, data,
                                                      batch["endpoint"],
                                                      settings.batch_max_lines,
                                                      settings.max_json_depth)
        if problems:
            batch["errors"] = {"object": "list", "data": [p.as_dict() for p in problems]}
            set_status(batch, "failed")
            await self._save_final(job)
            logger.warning("batch %s failed validation: %s", job.id, problems[0].message)
            return
        results = await asyncio.to_thread(self.store.read_results, job.id)
        # On a thread too: nothing else touches a job before it is loaded (_step awaits this).
        await asyncio.to_thread(job.start, lines, results)
        named = await asyncio.to_thread(_referenced, lines)
        if named and batch["status"] == "validating":
            job.images = await images.keep(self.store, self.state.uploads, job.id, job.owner,
                                           named)
        elif named:
            job.images = await asyncio.to_thread(images.restore, self.store, job.id)
        if batch["status"] == "validating":
            set_status(batch, "in_progress")
            await self._save(batch)
            logger.info("batch %s in progress: %d requests", job.id, len(lines))

    async def _begin_end(self, job: BatchJob, final: str) -> None:
        job.batch["_final"] = final
        set_status(job.batch, "finalizing")
        await self._save(job.batch)
        for cancel in job.running.values():
            cancel.set()

    async def _finalize(self, job: BatchJob) -> None:
        """Write the output and error files, then the final status."""
        batch = job.batch
        final = "cancelled" if batch["status"] == "cancelling" else batch.get("_final",
                                                                             "completed")
        if final == "expired":  # OpenAI's entry for each request the window left unrun
            unrun = [result_line(line, None, None, None, {
                "code": "batch_expired", "message": "This request could not be executed "
                "before the completion window expired."})
                for line in job.lines if line.index not in job.done]
            if unrun:  # one append, one fsync: 50,000 of them must not hold the runner
                await asyncio.to_thread(self.store.append_results, job.id, unrun)
            for result in unrun:
                job.record(result)
            self.state.metrics.batch_requests.labels("failed").inc(len(unrun))
        elif final == "cancelled":
            self.state.metrics.batch_requests.labels("cancelled").inc(
                max(0, len(job.lines) - len(job.done)))
        results = await asyncio.to_thread(self.store.read_results, job.id)
        latest = {r["_i"]: r for r in results}  # one per line, in input order
        ordered = [latest[i] for i in sorted(latest)]
        for key, kind, keep in (("output_file_id", "output", True),
                                ("error_file_id", "error", False)):
            chosen = [r for r in ordered if succeeded(r) == keep]
            if chosen:
                batch[key] = await asyncio.to_thread(self._write_file, job, kind, chosen)
        batch.pop("_final", None)
        set_status(batch, final)
        await self._save_final(job)
        counts = batch["request_counts"]
        logger.info("batch %s %s: %d completed, %d failed of %d", job.id, final,
                    counts["completed"], counts["failed"], counts["total"])

    def _write_file(self, job: BatchJob, kind: str, results: list[dict[str, Any]]) -> str:
        # The same id each time: finalizing again after a crash replaces, never duplicates.
        file_id = "file-" + hashlib.sha256(f"{job.id}:{kind}".encode()).hexdigest()[:32]
        text = "".join(batch_lines.dump_line({k: v for k, v in r.items() if k != "_i"})
                       for r in results)
        ttl_s = job.batch.get("_output_expires_s", self.state.settings.batch_file_ttl_s)
        self.store.add_file(f"{job.id}_{kind}.jsonl", "batch_output", text.encode(),
                            job.owner, file_id=file_id, ttl_s=ttl_s)
        return file_id

    async def _save_final(self, job: BatchJob) -> None:
        await self._save(job.batch)
        self._trouble.pop(job.id, None)
        if job.images:
            await asyncio.to_thread(self.store.drop_images, job.id)
        self.jobs.pop(job.id, None)
        # The output and error files hold the results now.
        await asyncio.to_thread(self.store.drop_results, job.id)
        if self.leases is not None:
            # Other replicas read the record from the store, so this one keeps no copy.
            await self.leases.release(job.id)
            self.batches.pop(job.id, None)
            self._published.pop(job.id, None)


def _lasting(exc: Exception) -> bool:
    """Whether loading the input would fail the same way again: it is unreadable or holds
    what no check foresaw. (Not a lost lease, an unreachable store, a full disk, too many
    open files or too little memory: those pass.)"""
    if isinstance(exc, LeaseLost | StateUnavailable):
        return False
    if isinstance(exc, OSError):
        return exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM,
                             errno.ENOENT)
    return not isinstance(exc, MemoryError)


def _referenced(lines: list[batch_lines.RequestLine]) -> set[str]:
    """The uploaded images the batch's lines name."""
    return set().union(*(batch_lines.referenced_files(line.body)
                         for line in lines if line.body is not None))
