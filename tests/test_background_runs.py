"""Pure logic of background runs (server.api.background): a run counts for the drain
while it runs, its events can be followed from any point while it runs and after, and a
shutdown stops what is still running (a fake run: the engine is not needed for this)."""

from __future__ import annotations

import asyncio

from server.api.background import BackgroundRun, BackgroundRuns
from server.api.drain import Drain
from server.engine import GenerationRequest


def run_of(response_id: str = "resp_1") -> BackgroundRun:
    return BackgroundRun(response_id, "owner", GenerationRequest(messages=[], max_tokens=1))


def test_followers_see_every_event_from_where_they_start() -> None:
    async def go() -> None:
        drain = Drain()
        runs = BackgroundRuns(drain)
        run = run_of()
        cancelled = run.generation.cancelled
        go_on = asyncio.Event()

        async def work() -> None:
            run.publish("e0")
            run.publish("e1")
            await go_on.wait()
            run.publish("e2")

        runs.start(run, work())
        await asyncio.sleep(0)
        assert drain.in_flight == 1 and not run.ended
        early = asyncio.create_task(_collect(run, None))
        late = asyncio.create_task(_collect(run, 0))
        await asyncio.sleep(0.01)
        go_on.set()
        assert await early == ["e0", "e1", "e2"] and await late == ["e1", "e2"]
        assert drain.in_flight == 0 and run.ended and cancelled.is_set()
        assert run.generation.messages == []  # the images are let go
        assert await _collect(run, 1) == ["e2"]  # after the end too
        assert runs.get("resp_1", "owner") is run and runs.get("resp_1", "other") is None

    asyncio.run(go())


def test_shutdown_stops_what_still_runs() -> None:
    async def go() -> None:
        runs = BackgroundRuns(Drain())
        run = run_of()

        async def work() -> None:  # as the engine: ends once the generation is cancelled
            while not run.generation.cancelled.is_set():
                await asyncio.sleep(0.01)

        runs.start(run, work())
        await runs.stop(timeout=5)
        assert run.ended and run.stop_reason == "shutdown"
        ended = run_of("resp_2")
        runs.start(ended, asyncio.sleep(0))
        await asyncio.sleep(0.01)
        ended.stop("cancelled")  # too late: it ended by itself
        assert ended.stop_reason is None

    asyncio.run(go())


async def _collect(run: BackgroundRun, starting_after: int | None) -> list[str]:
    return [line async for line in run.follow(starting_after)]
