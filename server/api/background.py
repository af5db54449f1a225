"""Background responses (`background: true` on POST /responses), as OpenAI's: answered at
once with status "queued", generated detached from the request (a client that leaves does
not stop it), its state in the response store (`GET /responses/{id}`: queued, in_progress,
then completed, incomplete, failed or cancelled), cancelled by `POST
/responses/{id}/cancel`, its events streamed now (`stream: true`) or later (`GET
/responses/{id}?stream=true&starting_after=N`) from the copy this process keeps.

The run belongs to the process that started it: only it holds the events and the
generation (a cancel sent to another replica marks the stored response cancelled; the
replica running it keeps that mark when it finishes). A run counts as a request in flight
for the drain (SIGTERM waits for it up to drain_timeout); one still running at shutdown
ends failed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from server.api.drain import Drain
from server.engine import GenerationRequest

logger = logging.getLogger("vlserve.api")

KEEP_EVENTS_S = 300.0  # an ended run's events stay this long for a late stream
KEEP_ENDED = 1000  # and at most this many ended runs' (the oldest go first)


class BackgroundRun:
    """One background response: its events as sent (the stream's SSE lines, numbered from
    0 by `sequence_number`, so `starting_after` is an index) and its generation."""

    def __init__(self, response_id: str, owner: str, generation: GenerationRequest) -> None:
        self.response_id = response_id
        self.owner = owner
        self.generation = generation
        self._cancelled = generation.cancelled  # kept after the run lets `generation` go
        self.lines: list[str] = []
        self.ended_at: float | None = None
        self.stop_reason: str | None = None  # "cancelled" or "shutdown": why it was stopped
        self.deleted = False  # DELETE /responses/{id} here: nothing more is written
        self._ended = asyncio.Event()
        self._wake = asyncio.Event()

    def publish(self, line: str) -> None:
        self.lines.append(line)
        self._wake.set()
        self._wake = asyncio.Event()

    def end(self) -> None:
        self._cancelled.set()  # whatever happened, the engine lets it go
        # Its messages hold the decoded images: only the events are kept from here on.
        self.generation = GenerationRequest(messages=[], max_tokens=1)
        self.ended_at = time.monotonic()
        self._ended.set()
        self._wake.set()

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def stop(self, reason: str) -> None:
        """Stop the generation (the engine drops it at its next step)."""
        if not self.ended and self.stop_reason is None:
            self.stop_reason = reason
            self._cancelled.set()

    async def wait_ended(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ended.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def follow(self, starting_after: int | None) -> AsyncIterator[str]:
        """The events after `starting_after` (all when None), then each one as it comes,
        until the run ends. Leaving does not stop the run."""
        index = 0 if starting_after is None else starting_after + 1
        while True:
            while index < len(self.lines):
                yield self.lines[index]
                index += 1
            if self.ended:
                return
            await self._wake.wait()


class BackgroundRuns:
    """This process's background responses: the running ones, and ended ones for
    KEEP_EVENTS_S (their events, for a late stream)."""

    def __init__(self, drain: Drain) -> None:
        self.drain = drain
        self._runs: dict[str, BackgroundRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, run: BackgroundRun, work: Coroutine[Any, Any, None]) -> None:
        self._forget_old()
        self._runs[run.response_id] = run
        self.drain.in_flight += 1  # SIGTERM waits for it as for a request
        task = asyncio.create_task(self._run(run, work), name=f"background {run.response_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, run: BackgroundRun, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception:
            logger.exception("background response %s failed", run.response_id)
        finally:
            run.end()
            self.drain.in_flight -= 1
            asyncio.get_running_loop().call_later(KEEP_EVENTS_S + 1, self._forget_old)

    def get(self, response_id: str, owner: str) -> BackgroundRun | None:
        self._forget_old()
        run = self._runs.get(response_id)
        return run if run is not None and run.owner == owner else None

    async def stop(self, timeout: float = 10.0) -> None:
        """At shutdown: stop every run still going (each ends failed) and let each record
        its end."""
        for run in self._runs.values():
            run.stop("shutdown")
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    def _forget_old(self) -> None:
        cutoff = time.monotonic() - KEEP_EVENTS_S
        ended = sorted((run.ended_at, response_id) for response_id, run in self._runs.items()
                       if run.ended_at is not None)
        over = len(ended) - KEEP_ENDED
        for index, (ended_at, response_id) in enumerate(ended):
            if ended_at < cutoff or index < over:
                del self._runs[response_id]
