"""Pure logic of background runs (server.api.background): a run counts for the drain
while it runs, its events can be followed from any point while it runs and after, and a
shutdown stops what is still running (a fake run: the engine is not needed for this)."""

from __future__ import annotations

import asyncio

import pytest

from server.api.background import BackgroundRun, BackgroundRuns
from server.api.drain import Drain
from server.api.errors import APIError
from server.engine import GenerationRequest


def run_of(response_id: str = "resp_1", owner: str = "owner") -> BackgroundRun:
    return BackgroundRun(response_id, owner, GenerationRequest(messages=[], max_tokens=1))


def test_followers_see_every_event_from_where_they_start() -> None:
    async def go() -> None:
        drain = Drain()
        runs = BackgroundRuns(drain, 256, 64)
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
        runs = BackgroundRuns(Drain(), 256, 64)
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


def test_runs_go_to_the_engine_one_at_a_time_in_order_when_there_is_room() -> None:
    async def go() -> None:
        runs = BackgroundRuns(Drain(), 256, 64)
        room = asyncio.Event()
        full_once = {"resp_1"}  # the engine's queue fills between the look and the submit
        submitted: list[str] = []

        async def submit(run: BackgroundRun) -> str:
            if run.response_id in full_once:
                full_once.discard(run.response_id)
                raise APIError(429, "the request queue is full", code="queue_full")
            submitted.append(run.response_id)
            await asyncio.sleep(0.01)  # up to its first event: the next one waits for it
            assert submitted[-1] == run.response_id
            return run.response_id

        line = [run_of(f"resp_{i}") for i in range(1, 5)]
        tasks = [asyncio.create_task(runs.in_turn(run, room.is_set, lambda r=run: submit(r)))
                 for run in line]
        await asyncio.sleep(0.2)
        assert submitted == []  # no room: all wait, none failed
        line[2].stop("cancelled")  # one cancelled while it waits leaves the line at once
        assert await asyncio.wait_for(tasks[2], 1) is None
        room.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks[:2], tasks[3]), 5)
        assert results == ["resp_1", "resp_2", "resp_4"]
        # In order: the first in line, refused once, asked again before any later one went.
        assert submitted == ["resp_1", "resp_2", "resp_4"] and not runs._line

    asyncio.run(go())


def test_keys_take_turns_each_in_its_own_order() -> None:
    """One key's waiting runs do not hold back another key's, created later: the keys
    take turns (the least lately served first), each key's runs in creation order."""
    async def go() -> None:
        runs = BackgroundRuns(Drain(), 256, 64)
        room = asyncio.Event()
        submitted: list[str] = []

        going: list[str] = []

        async def submit(run: BackgroundRun) -> str:
            submitted.append(run.response_id)
            going.append(run.response_id)
            await asyncio.sleep(0.005)
            assert going == [run.response_id]  # one at a time, whoever's turn came
            going.remove(run.response_id)
            return run.response_id

        def wait(run: BackgroundRun) -> asyncio.Task[str | None]:
            return asyncio.create_task(runs.in_turn(run, room.is_set, lambda: submit(run)))

        flood = [run_of(f"a{i}", "alice") for i in range(4)]
        tasks = [wait(run) for run in flood]
        await asyncio.sleep(0.05)
        tasks += [wait(run_of(f"b{i}", "bob")) for i in range(2)]
        await asyncio.sleep(0.05)
        room.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        # Bob, never served, goes right after Alice's first: then they alternate.
        assert submitted == ["a0", "b0", "a1", "b1", "a2", "a3"]
        assert not runs._line and not runs._served
        # A key that comes while another's run is on its way waits for that one.
        slow = asyncio.Event()

        async def slow_submit(run: BackgroundRun) -> str:
            going.append(run.response_id)
            await slow.wait()
            going.remove(run.response_id)
            return run.response_id

        first = asyncio.create_task(runs.in_turn(run_of("a9", "alice"), room.is_set,
                                                 lambda: slow_submit(run_of("a9", "alice"))))
        await asyncio.sleep(0.02)
        runs._served["alice"] = 99  # as if alice had been served lately
        late = wait(run_of("c0", "carol"))
        await asyncio.sleep(0.05)
        assert going == ["a9"]  # carol's turn, but a9 is still on its way
        slow.set()
        assert await asyncio.wait_for(asyncio.gather(first, late), 5) == ["a9", "c0"]

    asyncio.run(go())


def test_a_refusal_other_than_a_full_queue_ends_the_wait() -> None:
    async def go() -> None:
        runs = BackgroundRuns(Drain(), 256, 64)

        async def closing() -> str:
            raise APIError(503, "the server is shutting down", code="server_shutdown")

        with pytest.raises(APIError) as refused:
            await asyncio.wait_for(runs.in_turn(run_of(), lambda: True, closing), 1)
        assert refused.value.status == 503 and not runs._line

    asyncio.run(go())


def test_past_its_limits_a_new_run_is_a_429() -> None:
    async def go() -> None:
        runs = BackgroundRuns(Drain(), 3, 2)
        hold = asyncio.Event()
        for i, owner in enumerate(["a", "a", "b"]):
            runs.check_room(owner)
            runs.start(run_of(f"resp_{i}", owner), hold.wait())
        with pytest.raises(APIError) as over_all:
            runs.check_room("c")
        assert over_all.value.status == 429 and "3 background" in over_all.value.message
        assert over_all.value.code == "too_many_background_responses"
        hold.set()
        await asyncio.sleep(0.01)  # they end: room again
        runs.check_room("c")
        again = asyncio.Event()
        for i in range(2):
            runs.start(run_of(f"resp_a{i}", "a"), again.wait())
        with pytest.raises(APIError) as over_key:
            runs.check_room("a")
        assert "this key has 2" in over_key.value.message
        runs.check_room("b")  # another key is not held back by this one
        again.set()
        await asyncio.sleep(0.01)
        # A place reserved while a create awaits the store counts as a run.
        runs.reserve("a")
        runs.reserve("a")
        with pytest.raises(APIError):
            runs.reserve("a")
        runs.unreserve("a")  # that create failed: its place is free again
        runs.reserve("a")
        last = asyncio.Event()
        runs.start(run_of("resp_a9", "a"), last.wait(), reserved=True)  # its place
        with pytest.raises(APIError):
            runs.check_room("a")
        last.set()
        await asyncio.sleep(0.01)
        runs.start(run_of("resp_a10", "a"), asyncio.sleep(0), reserved=True)
        await asyncio.sleep(0.01)
        runs.check_room("a")
        assert not runs._reserved

    asyncio.run(go())


async def _collect(run: BackgroundRun, starting_after: int | None) -> list[str]:
    return [line async for line in run.follow(starting_after)]
