"""The one-response-per-conversation lock (server.api.conversation_locks) on both backends:
in this process (memory://) and among replicas sharing a real Redis, each replica its own
client. The same scenarios hold on each: one holder, a lapse, a touch, a pin, a lapsed
holder's late release; on Redis, a holder that dies frees the conversation within its hold,
and a Redis out of reach is StateUnavailable (a 503), not a hang."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from redis_server import RedisServer, start_redis

from bench.servers import free_port
from server.api.conversation_locks import (
    ConversationLocks,
    Locks,
    open_conversation_locks,
)
from server.api.conversation_locks_shared import SharedConversationLease, SharedConversationLocks
from server.api.errors import APIError
from server.store import StateUnavailable, open_backend

LAPSE_S = 1.0
HOLD_S = 0.6  # renewed every 0.2 s: well under the lapse, so a renewal is seen to work


@pytest.fixture(params=["memory", "redis"])
def url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    return request.getfixturevalue("redis").url(0)


@asynccontextmanager
async def replicas(url: str, count: int = 2, hold_s: float = HOLD_S
                   ) -> AsyncIterator[list[Locks]]:
    """`count` replicas' locks on one store (each its own client); with memory:// one
    process's locks, shared by all (there is no other replica)."""
    if url == "memory://":
        locks = ConversationLocks(LAPSE_S)
        yield [locks] * count
        return
    name = f"locks{uuid.uuid4().hex}"  # tests never see each other's keys
    backends = [open_backend(url, timeout_s=2) for _ in range(count)]
    try:
        yield [SharedConversationLocks(b.leases(name), LAPSE_S, hold_s)  # type: ignore[arg-type]
               for b in backends]
    finally:
        for backend in backends:
            await backend.close()


async def refused(locks: Locks, conversation_id: str = "conv_a") -> bool:
    """Whether a response on the conversation is refused now, as locked (the reason)."""
    try:
        lease = await locks.acquire(conversation_id)
    except APIError as exc:
        assert (exc.status, exc.code, exc.param) == (400, "conversation_locked",
                                                      "conversation")
        assert "another response is running" in exc.message
        return True
    await lease.aclose()
    return False


def test_the_backend_picks_the_lock(redis: RedisServer) -> None:
    async def main() -> None:
        memory, shared = open_backend("memory://"), open_backend(redis.url(0))
        assert isinstance(open_conversation_locks(memory, 60), ConversationLocks)
        assert isinstance(open_conversation_locks(shared, 60), SharedConversationLocks)
        await shared.close()
    asyncio.run(main())


def test_one_holder_at_a_time_and_a_release_frees_it(url: str) -> None:
    async def main() -> None:
        async with replicas(url) as (a, b):
            lease = await a.acquire("conv_a")
            assert await refused(b) and await refused(a)
            assert not await refused(b, "conv_b")  # another conversation is not held up
            await lease.aclose()  # free once it returns: the next turn is had at once
            assert not await refused(b)
            lease.release()  # idempotent: the stream's end and a background task may both
            again = await b.acquire("conv_a")
            again.release()  # does not wait (a cancelled task's `finally`), frees it soon
            deadline = time.monotonic() + 2
            while await refused(a):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
    asyncio.run(main())


def test_a_lapsing_lease_lapses_and_its_late_release_keeps_the_successor(url: str) -> None:
    async def main() -> None:
        async with replicas(url) as (a, b):
            forgotten = await a.acquire("conv_a", lapses=True)  # a stream never started
            await asyncio.sleep(LAPSE_S * 0.4)
            assert await refused(b)
            await asyncio.sleep(LAPSE_S * 0.8)
            successor = await b.acquire("conv_a")
            await forgotten.aclose()  # late: must not free the successor's hold
            assert await refused(a)
            await asyncio.sleep(LAPSE_S + HOLD_S)  # a lease that does not lapse stays,
            assert await refused(a)  # its expiry in the store pushed back while held
            await successor.aclose()
            assert not await refused(a)
    asyncio.run(main())


def test_a_lapsed_lease_never_given_back_keeps_no_task(redis: RedisServer) -> None:
    """Its keeper ends a lapse after it lapsed: a stream that never started would otherwise
    leave one waiting task a time for the process's life."""
    async def main() -> None:
        async with replicas(redis.url(0), count=1) as (a,):
            forgotten = await a.acquire("conv_a", lapses=True)
            assert isinstance(forgotten, SharedConversationLease)
            await asyncio.sleep(LAPSE_S * 1.5)
            assert not forgotten.keeper.done()  # lapsed, still able to be touched or pinned
            await asyncio.sleep(LAPSE_S * 1.5)
            assert forgotten.keeper.done() and not await refused(a)
    asyncio.run(main())


def test_a_touch_counts_the_lapse_again_and_a_pin_holds_past_it(url: str) -> None:
    async def main() -> None:
        async with replicas(url) as (a, b):
            queued = await a.acquire("conv_a", lapses=True)
            await asyncio.sleep(LAPSE_S * 0.6)
            queued.touch()  # handed over after its time in the queue
            await asyncio.sleep(LAPSE_S * 0.6)  # past the first lapse, not the touched one
            assert await refused(b)
            await asyncio.sleep(LAPSE_S * 0.6)
            assert not await refused(b)
            await queued.aclose()
            started = await a.acquire("conv_a", lapses=True)
            started.pin()  # its stream started: it holds until given back
            await asyncio.sleep(LAPSE_S + HOLD_S)
            assert await refused(b)
            await started.aclose()
            assert not await refused(b)
    asyncio.run(main())


def test_a_holder_that_dies_frees_the_conversation_within_its_hold(
        redis: RedisServer) -> None:
    async def main() -> None:
        async with replicas(redis.url(0)) as (a, b):
            lease = await a.acquire("conv_a", lapses=True)
            lease.pin()
            await asyncio.sleep(HOLD_S * 2)  # renewed: held past its first expiry
            assert await refused(b)
            assert isinstance(lease, SharedConversationLease)
            lease.keeper.cancel()  # replica A dies: nothing renews it, nothing gives it back
            died = time.monotonic()
            while await refused(b):
                assert time.monotonic() - died < HOLD_S + 0.5, "the dead holder's lock stayed"
                await asyncio.sleep(0.02)
            assert time.monotonic() - died > HOLD_S / 3  # not freed by anything but expiry
    asyncio.run(main())


def test_a_held_lock_outlives_a_redis_restart(tmp_path: Path) -> None:
    """Redis gone for less than the hold (restarted empty): the holder takes its key back at
    its next renewal, and nobody else got in meanwhile."""
    own = start_redis(tmp_path)

    async def main() -> None:
        async with replicas(own.url(0)) as (a, b):
            lease = await a.acquire("conv_a")
            own.stop()
            with pytest.raises(StateUnavailable):  # a 503 for the next turn meanwhile
                await b.acquire("conv_a")
            await asyncio.sleep(HOLD_S / 2)  # a renewal failed (logged), the keeper goes on
            own.start()
            await asyncio.sleep(HOLD_S / 2)
            assert await refused(b)
            await lease.aclose()
            assert not await refused(b)
    try:
        asyncio.run(main())
    finally:
        own.stop()


def test_an_unreachable_redis_is_state_unavailable_promptly() -> None:
    async def main() -> None:
        backend = open_backend(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
        locks = open_conversation_locks(backend, LAPSE_S)
        started = time.monotonic()
        with pytest.raises(StateUnavailable, match="shared state store did not answer"):
            await locks.acquire("conv_a")
        assert time.monotonic() - started < 2
        await backend.close()
    asyncio.run(main())
