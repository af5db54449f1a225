"""Background responses (`background: true` on POST /responses), as OpenAI's: answered at
once with status "queued", generated detached from the request (a client that leaves does
not stop it), its state in the response store (`GET /responses/{id}`: queued, in_progress,
then completed, incomplete, failed or cancelled), cancelled by `POST
/responses/{id}/cancel`, its events streamed now (`stream: true`) or later (`GET
/responses/{id}?stream=true&starting_after=N`) from the copy this process keeps.

The run belongs to the process that started it: only it holds the events and the
generation (a cancel or delete sent to another replica reaches it through a stop mark in
the shared store: server.api.background_marks). A run counts as a request in flight
for the drain (SIGTERM waits for it up to drain_timeout); one still running at shutdown
ends failed.

Background work never crowds out the requests clients wait on: runs go to the engine one
at a time (the keys taking turns, each key's runs in the order they were created; one
key's hundred waiting runs do not hold back another key's first), and only while its
queue is at most half full
(a run waits "queued" for that, however long, instead of failing on a full queue), and a
replica holds at most `background_max_runs` of them (`background_max_runs_per_key` for
one key): past that, creating one is a 429."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from server.api.drain import Drain
from server.api.errors import APIError
from server.engine import GenerationRequest

logger = logging.getLogger("vlserve.api")

KEEP_EVENTS_S = 300.0  # an ended run's events stay this long for a late stream
KEEP_ENDED = 1000  # and at most this many ended runs' (the oldest go first)
# The first run in line asks again this often (doubling up to the cap) for room in the
# engine's queue: the engine has no signal for it, and a background run can wait a moment.
ROOM_POLL_S = (0.05, 1.0)

T = TypeVar("T")


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
        self.stopped = asyncio.Event()  # set with stop_reason: wakes a run waiting in line
        self.first_in_line = asyncio.Event()  # set when the run before it leaves the line

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
            self.stopped.set()

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

    def __init__(self, drain: Drain, max_runs: int, max_runs_per_key: int) -> None:
        self.drain = drain
        self.max_runs = max_runs
        self.max_runs_per_key = max_runs_per_key
        self._runs: dict[str, BackgroundRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.running = 0  # started and not ended: waiting or generating
        self._reserved: Counter[str] = Counter()  # places held for runs being created
        self._line: deque[BackgroundRun] = deque()  # waiting to go to the engine, in order
        # When each key with runs in line last had one go (a count): the least lately
        # served key goes next.
        self._served: dict[str, int] = {}
        self._turns = itertools.count(1)
        self._submitting: BackgroundRun | None = None  # one run at a time to the engine

    def running_now(self) -> list[BackgroundRun]:
        """The runs not ended yet (waiting or generating)."""
        return [run for run in self._runs.values() if not run.ended]

    def active(self, owner: str) -> int:
        """`owner`'s runs not ended yet (waiting or generating)."""
        return sum(1 for run in self._runs.values() if not run.ended and run.owner == owner)

    def check_room(self, owner: str) -> None:
        """A 429 when this replica holds as many background responses as it may take, in
        all or for `owner` (reserved ones included): each waiting one keeps its decoded
        images in memory."""
        if self.running + sum(self._reserved.values()) >= self.max_runs:
            raise APIError(429, f"background: this server is running {self.max_runs} "
                           "background responses, as many as it takes; retry later",
                           code="too_many_background_responses",
                           headers={"Retry-After": "5"}, param="background")
        if self.active(owner) + self._reserved[owner] >= self.max_runs_per_key:
            raise APIError(429, f"background: this key has {self.max_runs_per_key} "
                           "background responses running, as many as it may; retry once "
                           "one has ended", code="too_many_background_responses",
                           headers={"Retry-After": "5"}, param="background")

    def reserve(self, owner: str) -> None:
        """check_room, and a place held for `owner` until `start` takes it (or `unreserve`
        gives it back): creates awaiting the store meanwhile cannot all pass the check."""
        self.check_room(owner)
        self._reserved[owner] += 1

    def unreserve(self, owner: str) -> None:
        self._reserved[owner] -= 1
        if not self._reserved[owner]:
            del self._reserved[owner]

    async def in_turn(self, run: BackgroundRun, has_room: Callable[[], bool],
                      submit: Callable[[], Awaitable[T]]) -> T | None:
        """`submit` (the run to the engine, up to its first event) once it is its turn
        (`_next`) and `has_room()` says the engine's queue can take background work; a full
        queue meanwhile (APIError 429) means waiting on. None when the run was stopped
        (cancelled, shut down) while it waited."""
        self._line.append(run)
        try:
            pause = ROOM_POLL_S[0]
            while run.stop_reason is None:
                # Its turn, and no other run on its way to the engine (a key's turn can
                # come while another key's run still waits for its first event).
                first = self._next() is run and self._submitting in (None, run)
                if first and has_room():
                    self._submitting = run
                    try:
                        started = await submit()
                    except APIError as refused:
                        if refused.status != 429:  # the server is closing, ...
                            raise
                    else:
                        self._served[run.owner] = next(self._turns)
                        return started
                    finally:
                        self._submitting = None
                if first:  # it alone asks again for room, after a pause
                    await _first_of(run.stopped, timeout=pause)
                    pause = min(pause * 2, ROOM_POLL_S[1])
                else:  # the others sleep until it is their turn (no await since the look)
                    run.first_in_line.clear()
                    await _first_of(run.first_in_line, run.stopped, timeout=None)
            return None
        finally:
            self._line.remove(run)
            if not any(waiting.owner == run.owner for waiting in self._line):
                self._served.pop(run.owner, None)  # back later, it has waited least lately
            after = self._next()
            if after is not None:  # whose turn it is now (maybe already awake): it alone
                after.first_in_line.set()

    def _next(self) -> BackgroundRun | None:
        """Whose turn it is: of the keys with runs in line, the one served least lately
        (never, or not since it last had none waiting, counts as longest ago), and its
        earliest run."""
        return min(self._line, key=lambda waiting: self._served.get(waiting.owner, 0),
                   default=None)

    def start(self, run: BackgroundRun, work: Coroutine[Any, Any, None], *,
              reserved: bool = False) -> None:
        """Run `work` for `run`; `reserved`: in the place `reserve` held for its owner."""
        if reserved:
            self.unreserve(run.owner)
        self._forget_old()
        self._runs[run.response_id] = run
        self.drain.in_flight += 1  # SIGTERM waits for it as for a request
        self.running += 1
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
            self.running -= 1
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


async def _first_of(*events: asyncio.Event, timeout: float | None) -> None:
    """Until one of `events` is set or `timeout` passes."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
