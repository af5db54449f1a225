"""Runs batches: validates them, feeds their lines to the engine, finalizes them.

One asyncio task on the server's event loop. It keeps at most `batch_in_flight` lines
(by default one per slot and one waiting) in the engine at batch priority, so batch work
fills the slots interactive requests leave idle and steps aside when they need one (the
engine preempts it; see server/engine/admission.py). Each finished line is appended to
the batch's results log on disk before it counts as done, so a restart runs only what has
no result yet.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from server.batches.store import BatchStore
from server.engine.types import BATCH_PRIORITY

logger = logging.getLogger("vlserve.batches")

# Answers that say "not now" rather than "no": the line runs again later, nothing recorded.
_RETRY = {429: 1.0, 499: 0.0, 503: 2.0}
_TICK_S = 1.0  # how often expiry and drain are checked while nothing else happens


class BatchRunner:
    def __init__(self, app: ASGIApp, state: AppState, store: BatchStore) -> None:
        self.app = app
        self.state = state
        self.store = store
        self.batches: dict[str, dict[str, Any]] = {}  # every batch object, by id
        self.jobs: dict[str, BatchJob] = {}  # the unfinished ones
        self.in_flight = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._lines: set[asyncio.Task[None]] = set()
        self._version = itertools.count(1)

    @property
    def limit(self) -> int:
        settings = self.state.settings
        # One more than the slots: a line waits in the queue for the next free slot, so no
        # slot idles while the runner records a finished line and starts the next.
        return settings.batch_in_flight or settings.n_parallel + 1

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Load every batch on disk; unfinished ones carry on where they stopped."""
        for batch in await asyncio.to_thread(lambda: list(self.store.load_batches())):
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

    async def _save(self, batch: dict[str, Any]) -> None:
        """Snapshot on the loop (nothing changes it meanwhile), write on a worker thread;
        the version keeps a slower older write from replacing a newer one."""
        data = json.dumps(batch).encode()
        await asyncio.to_thread(self.store.save_batch, batch["id"], data, next(self._version))

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # --- API -----------------------------------------------------------------------------
    async def add(self, batch: dict[str, Any]) -> dict[str, Any]:
        await self._save(batch)
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
            except Exception:  # one bad batch must not stop the others for good
                logger.exception("the batch runner failed; retrying shortly")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _TICK_S)

    async def _advance(self) -> None:
        for job in sorted(self.jobs.values(), key=lambda j: order_key(j.batch)):
            if not job.lines:  # new, or resumed after a restart
                await self._load(job)
                if job.id not in self.jobs:
                    continue  # failed validation
            status = job.batch["status"]
            if status == "in_progress" and time.time() >= job.batch["expires_at"]:
                await self._begin_end(job, "expired")
            elif status == "in_progress" and job.all_done() and not job.running:
                await self._begin_end(job, "completed")
            if job.batch["status"] in ("cancelling", "finalizing") and not job.running:
                await self._finalize(job)
        if self.state.drain.draining:
            for job in self.jobs.values():  # they run again after the restart
                for cancel in job.running.values():
                    cancel.set()
            return
        if not self.state.engine.ready:
            return
        self._launch()

    def _launch(self) -> None:
        now = time.monotonic()
        for job in sorted(self.jobs.values(), key=lambda j: order_key(j.batch)):
            if job.batch["status"] != "in_progress":
                continue
            while self.in_flight < self.limit:
                line = job.next_line(now)
                if line is None:
                    break
                cancel = asyncio.Event()
                job.running[line.index] = cancel
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
        else:
            lines, problems = batch_lines.parse(data, batch["endpoint"],
                                                settings.batch_max_lines)
        if problems:
            batch["errors"] = {"object": "list", "data": [p.as_dict() for p in problems]}
            set_status(batch, "failed")
            await self._save_final(job)
            logger.warning("batch %s failed validation: %s", job.id, problems[0].message)
            return
        job.start(lines, await asyncio.to_thread(self.store.read_results, job.id))
        named = set().union(*(batch_lines.referenced_files(line.body)
                              for line in lines if line.body is not None))
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
            for line in job.lines:
                if line.index not in job.done:
                    result = result_line(line, None, None, None, {
                        "code": "batch_expired", "message": "This request could not be "
                        "executed before the completion window expired."})
                    await asyncio.to_thread(self.store.append_result, job.id, result)
                    job.record(result)
                    self.state.metrics.batch_requests.labels("failed").inc()
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
        self.store.add_file(f"{job.id}_{kind}.jsonl", "batch_output", text.encode(),
                            job.owner, file_id=file_id)
        return file_id

    async def _save_final(self, job: BatchJob) -> None:
        await self._save(job.batch)
        if job.images:
            await asyncio.to_thread(self.store.drop_images, job.id)
        self.jobs.pop(job.id, None)
