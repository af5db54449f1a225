"""The store layer (server.store) on both backends: the same bounds hold in memory and in
a real Redis (redis-server on loopback), each scenario run against each; Redis's counters
stay exact under concurrent writers; an unreachable Redis is StateUnavailable, promptly."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from redis_server import RedisServer

from bench.servers import free_port
from server.store import Bounds, Codec, StateUnavailable, Table, TableFull, open_backend
from server.store.backend import POOL_SIZE

TEXT: Codec[str] = Codec(lambda s: (s.encode(), b"body:" + s.encode()),
                         lambda head, body: head.decode() + ("" if body is None else "+"))


@pytest.fixture(params=["memory", "redis"])
def url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    return request.getfixturevalue("redis").url(0)


def bounds(**kw: object) -> Bounds:
    values: dict = {"max_count": 100, "max_bytes": 10_000, "ttl_s": 3600,
                    "max_count_per_owner": 100, "max_bytes_per_owner": 10_000, **kw}
    return Bounds(**values)


def run(url: str, b: Bounds, scenario: Callable[[Table[str]], Awaitable[None]]) -> None:
    """The scenario on a fresh table (its own name: tests never see each other's keys)."""
    async def main() -> None:
        backend = open_backend(url, timeout_s=5)
        try:
            await scenario(backend.table(f"t{uuid.uuid4().hex}", b, TEXT))
        finally:
            await backend.close()
    asyncio.run(main())


def test_owners_are_apart_and_reads_return_bodies(url: str) -> None:
    async def scenario(t: Table[str]) -> None:
        await t.put("alice", "k1", "v1", 10)
        assert await t.get("alice", "k1") in ("v1", "v1+")  # Redis: the body came back too
        assert await t.get("bob", "k1") is None
        assert not await t.delete("bob", "k1")
        assert await t.heads("alice") == ["v1"] and await t.heads("bob") == []
        assert await t.owner_usage("alice") == (1, 10)
        assert await t.delete("alice", "k1") and await t.get("alice", "k1") is None
        assert await t.owner_usage("alice") == (0, 0)
    run(url, bounds(), scenario)


def test_a_large_body_comes_back_whole_and_a_head_reads_none(url: str) -> None:
    """Redis sends a body in 1 MiB pieces (server.store.redis_table): put back together."""
    bodies: dict[str, bytes] = {}
    codec: Codec[str] = Codec(lambda s: (s.encode(), bodies[s]),
                              lambda head, body: f"{head.decode()}:{len(body or b'')}:"
                              f"{body == bodies[head.decode()]}")

    async def main() -> None:
        backend = open_backend(url, timeout_s=5)
        try:
            t = backend.table(f"t{uuid.uuid4().hex}", bounds(max_bytes=1 << 24,
                                                              max_bytes_per_owner=1 << 24),
                              codec)
            for size in (1 << 20, (3 << 20) + 7):  # one piece, then four
                key = f"b{size}"
                bodies[key] = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
                await t.put("alice", key, key, 10)
                # Memory keeps the value itself; Redis decodes it, with no body for head.
                assert await t.get("alice", key) in (key, f"{key}:{size}:True")
                assert await t.head("alice", key) in (key, f"{key}:0:False")
            assert await t.head("bob", key) is None
        finally:
            await backend.close()
    asyncio.run(main())


def test_lru_reads_refresh_and_an_owner_evicts_only_its_own(url: str) -> None:
    async def scenario(t: Table[str]) -> None:
        for key in ("a1", "a2", "a3"):
            await t.put("a", key, key, 10)
        await t.put("b", "b1", "b1", 10)
        assert await t.get("a", "a1")  # a1 used: a2 is now the least recently used
        await t.put("a", "a4", "a4", 10)
        assert await t.heads("a") == ["a3", "a1", "a4"] and await t.heads("b") == ["b1"]
    run(url, bounds(max_count_per_owner=3, lru=True), scenario)


def test_oldest_first_ignores_reads(url: str) -> None:
    async def scenario(t: Table[str]) -> None:
        for key in ("a1", "a2", "a3"):
            await t.put("a", key, key, 10)
        assert await t.get("a", "a1")
        await t.put("a", "a4", "a4", 10)
        assert await t.heads("a") == ["a2", "a3", "a4"]
    run(url, bounds(max_count_per_owner=3, lru=False), scenario)


def test_a_full_table_refuses_rather_than_evict_another_owner(url: str) -> None:
    async def scenario(t: Table[str]) -> None:
        for key in ("a1", "a2", "a3"):
            await t.put("a", key, key, 10)
        await t.put("b", "b1", "b1", 10)
        with pytest.raises(TableFull):
            await t.put("c", "c1", "c1", 10)
        await t.put("b", "b2", "b2", 10)  # the table is full: b's own b1 makes room
        assert await t.heads("a") == ["a1", "a2", "a3"] and await t.heads("b") == ["b2"]
    run(url, bounds(max_count=4, max_count_per_owner=3, lru=True), scenario)


def test_evict_others_takes_the_oldest_of_all_and_bytes_are_bounded(url: str) -> None:
    async def scenario(t: Table[str]) -> None:
        await t.put("a", "a1", "a1", 40)
        await t.put("b", "b1", "b1", 40)
        await t.put("c", "c1", "c1", 40)  # 120 > 100: a1, the oldest of all, goes
        assert await t.heads("a") == [] and await t.heads("b") == ["b1"]
        await t.put("b", "b2", "b2", 60)  # b over its 70-byte share: its own b1 goes
        assert await t.heads("b") == ["b2"] and await t.owner_usage("b") == (1, 60)
    run(url, bounds(max_bytes=100, max_bytes_per_owner=70, evict_others=True), scenario)


def test_a_put_on_a_held_key_replaces_it(url: str) -> None:
    """How a record is updated (a batch job's status): counted once, not twice."""
    async def scenario(t: Table[str]) -> None:
        await t.put("a", "k", "v1", 10)
        await t.put("a", "j", "j", 5)
        await t.put("a", "k", "v2", 30)
        assert await t.heads("a") == ["j", "v2"] and await t.owner_usage("a") == (2, 35)
    run(url, bounds(), scenario)


def test_entries_expire_after_the_ttl(url: str) -> None:
    ttl = 2.0

    async def scenario(t: Table[str]) -> None:
        stored = time.monotonic()
        await t.put("a", "k", "v", 10)
        assert await t.owner_usage("a") == (1, 10)
        while await t.get("a", "k") is not None:
            assert time.monotonic() - stored < ttl + 30, "never expired"
            await asyncio.sleep(0.1)
        assert time.monotonic() - stored >= ttl - 0.5
        assert await t.owner_usage("a") == (0, 0)  # the counters went with it
    run(url, bounds(ttl_s=ttl), scenario)


def test_concurrent_writers_keep_the_redis_counters_exact(redis: RedisServer) -> None:
    """Two processes' worth of writers at once (two connection pools): every bound holds
    and the byte counters equal what is left, as each put is one atomic script."""
    name = f"t{uuid.uuid4().hex}"
    b = bounds(max_count=30, max_bytes=10**6, max_count_per_owner=12, max_bytes_per_owner=500)

    async def main() -> list[tuple[int, int]]:
        replicas = [open_backend(redis.url(0)) for _ in range(2)]
        tables = [r.table(name, b, TEXT) for r in replicas]
        await asyncio.gather(*(tables[i % 2].put(f"o{i % 3}", f"k{i}", f"k{i}", 10 + i % 7)
                               for i in range(150)))
        usage = [await tables[0].owner_usage(f"o{n}") for n in range(3)]
        heads = [await tables[1].heads(f"o{n}") for n in range(3)]
        for r in replicas:
            await r.close()
        for (count, used), mine in zip(usage, heads, strict=True):
            assert count == len(mine) <= 12
            assert used == sum(10 + int(k[1:]) % 7 for k in mine) <= 500
        return usage

    usage = asyncio.run(main())
    assert redis.command("ZCARD", f"vlserve:{name}:born") == f":{sum(c for c, _ in usage)}"
    assert redis.command("GET", f"vlserve:{name}:bytes") is not None


def test_a_burst_past_the_connection_pool_waits_instead_of_failing(redis: RedisServer
                                                                    ) -> None:
    """More calls at once than the pool has connections (a burst of uploads): the extra
    ones wait their turn. redis-py's default pool raised MaxConnectionsError at once, and a
    healthy Redis answered 503 to a third of them."""
    calls = POOL_SIZE + 50
    body = b"x" * (1 << 20)  # 1 MiB each: every call holds its connection a while
    codec: Codec[str] = Codec(lambda s: (s.encode(), body), lambda head, _: head.decode())

    async def main() -> None:
        backend = open_backend(redis.url(0), timeout_s=10)
        try:
            t = backend.table(f"t{uuid.uuid4().hex}", bounds(
                max_count=calls, max_count_per_owner=calls, max_bytes=calls << 21,
                max_bytes_per_owner=calls << 21), codec)
            await asyncio.gather(*(t.put(f"o{i}", f"k{i}", f"v{i}", len(body))
                                   for i in range(calls)))
            assert [await t.head(f"o{i}", f"k{i}") for i in range(calls)] == [
                f"v{i}" for i in range(calls)]
        finally:
            await backend.close()
    asyncio.run(main())


def test_a_lock_is_held_by_one_replica_at_a_time(redis: RedisServer) -> None:
    """StateBackend.exclusive across two connection pools (two replicas): the holders never
    overlap; one waiting past twice the state timeout gets StateUnavailable."""
    name = f"l{uuid.uuid4().hex}"

    async def main() -> None:
        # A 2 s state timeout while eight holders contend (a loaded box may stall a call);
        # a 0.5 s one for the wait that must give up.
        replicas = [open_backend(redis.url(0), timeout_s=2) for _ in range(2)]
        impatient = open_backend(redis.url(0), timeout_s=0.5)
        inside, most, order = 0, 0, []

        async def hold(i: int) -> None:
            nonlocal inside, most
            async with replicas[i % 2].exclusive(name):
                inside += 1
                most = max(most, inside)
                await asyncio.sleep(0.01)  # awaits inside: another task would step in
                order.append(i)
                inside -= 1

        await asyncio.gather(*(hold(i) for i in range(8)))
        assert most == 1 and sorted(order) == list(range(8))
        async with replicas[0].exclusive(name):
            started = time.monotonic()
            with pytest.raises(StateUnavailable, match="stayed locked"):
                async with impatient.exclusive(name):
                    pass
            assert 0.9 < time.monotonic() - started < 5
        async with replicas[1].exclusive(name):  # released: had at once
            pass
        for r in [*replicas, impatient]:
            await r.close()

    asyncio.run(main())


def test_an_unreachable_redis_is_state_unavailable_within_the_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        backend = open_backend(f"redis://127.0.0.1:{free_port()}/0", timeout_s=2)
        table = backend.table("t", bounds(), TEXT)
        for call in (lambda: table.put("a", "k", "v", 1), lambda: table.get("a", "k"),
                     lambda: table.heads("a"), backend.ping):
            started = time.monotonic()
            with pytest.raises(StateUnavailable, match="did not answer"):
                await call()
            assert time.monotonic() - started < 15  # bounded by the timeout, with margin
        await backend.close()
    asyncio.run(main())


def test_state_url_is_checked_at_startup() -> None:
    from server.config import ConfigError, load_settings

    assert load_settings(None).state_url == "memory://"
    with pytest.raises(ConfigError, match="state_url: expected memory://, redis://"):
        load_settings(None, state_url="redis:/oops")
    assert load_settings(None, state_url="redis://h:6379/2").state_url == "redis://h:6379/2"


def test_the_logged_state_url_hides_a_password() -> None:
    from server.store.backend import redacted

    assert redacted("redis://:s3cret@cache:6379/1") == "redis://:***@cache:6379/1"
    assert redacted("redis://app:s3cret@cache/0") == "redis://app:***@cache/0"
    assert redacted("redis://cache:6379/0") == "redis://cache:6379/0"
