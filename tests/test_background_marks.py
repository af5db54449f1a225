"""Stop marks (server.api.background_marks) in a real Redis: a mark is the owner's (another
key's DELETE of the same id cannot replace it), and the watcher stops the marked runs of
its replica, trying again after a failed read rather than skipping the mark for good."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis_server import RedisServer

from server.api import background_marks
from server.api.background import BackgroundRun, BackgroundRuns
from server.api.background_marks import StopMarks
from server.api.drain import Drain
from server.engine import GenerationRequest
from server.store import StateUnavailable, open_backend


def run_of(response_id: str, owner: str) -> BackgroundRun:
    return BackgroundRun(response_id, owner, GenerationRequest(messages=[], max_tokens=1))


def test_a_mark_is_its_owners(redis: RedisServer) -> None:
    async def go() -> None:
        backend = open_backend(redis.url(0))
        marks = StopMarks(backend)
        await marks.mark("resp_1", "alice", "cancelled")
        await marks.mark("resp_1", "mallory", "deleted")  # a 404 for mallory, marked first
        assert await marks.read(run_of("resp_1", "alice")) == "cancelled"
        assert await marks.read(run_of("resp_2", "alice")) is None
        await backend.close()

    asyncio.run(go())


def test_the_watcher_stops_marked_runs_and_retries_a_failed_read(
        redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(background_marks, "MARK_POLL_S", 0.02)

    async def go() -> None:
        backend = open_backend(redis.url(1))
        marks, elsewhere = StopMarks(backend), StopMarks(backend)
        runs = BackgroundRuns(Drain(), 10, 10)
        kept, deleted, untouched = (run_of(f"resp_{n}", "alice") for n in "abc")
        for run in (kept, deleted, untouched):
            runs.start(run, run.stopped.wait())
        real_read = marks.read
        failures = [StateUnavailable("a blip")]

        async def flaky_read(run: BackgroundRun) -> Any:
            if failures:
                raise failures.pop()
            return await real_read(run)

        monkeypatch.setattr(marks, "read", flaky_read)
        await elsewhere.mark("resp_a", "alice", "cancelled")  # another replica's requests
        await elsewhere.mark("resp_b", "alice", "deleted")
        watching = asyncio.create_task(marks.watch(runs))  # its first read fails
        await asyncio.wait_for(asyncio.gather(kept.stopped.wait(), deleted.stopped.wait()), 5)
        assert not failures  # the first read failed, and the marks were read again after
        assert (kept.stop_reason, kept.deleted) == ("cancelled", False)
        assert (deleted.stop_reason, deleted.deleted) == ("cancelled", True)
        assert untouched.stop_reason is None
        watching.cancel()
        untouched.stop("shutdown")
        await runs.stop(timeout=5)
        await backend.close()

    asyncio.run(go())
