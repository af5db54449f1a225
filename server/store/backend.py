"""`state_url` → where the tables live: this process (`memory://`) or one Redis."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from server.store.bounds import Bounds
from server.store.memory import MemoryTable
from server.store.table import AsyncMemoryTable, Codec, Table

if TYPE_CHECKING:
    from server.store.redis_leases import RedisLeases

T = TypeVar("T")

SCHEMES = ("memory", "redis", "rediss", "unix")
# A replica that dies holding a lock (server.store.backend.StateBackend.exclusive) holds it
# this long at most; what it guards (a read, a change, a write) takes well under a second.
LOCK_LEASE_S = 30.0

logger = logging.getLogger("vlserve.store")


# Connections to Redis one process keeps at most: calls take about a millisecond, so 100
# serve thousands a second; more would only move the queue into Redis.
POOL_SIZE = 100


class StateBackend:
    """Makes the named tables; one Redis connection pool serves them all."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        scheme = urlsplit(url).scheme or "memory"
        if scheme not in SCHEMES:
            raise ValueError(f"state_url: unknown scheme {scheme!r} (one of {SCHEMES})")
        self.url = url
        self.shared = scheme != "memory"
        # This process's tables by name, with their codecs (server.store.snapshot).
        self.memory_tables: dict[str, tuple[MemoryTable[Any], Codec[Any]]] = {}
        self._timeout_s = timeout_s
        self._client = None
        if self.shared:
            import redis.asyncio as aioredis  # only a shared store needs the client

            # Socket timeouts below the per-call limit: a Redis that vanished is a 503 in
            # seconds, never a request that hangs. A blocking pool: past POOL_SIZE calls at
            # once (a burst of uploads) a call waits for a connection, where redis-py's
            # default pool failed it at once and a healthy Redis answered 503.
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=POOL_SIZE, timeout=timeout_s / 2,
                socket_timeout=timeout_s / 2, socket_connect_timeout=timeout_s / 2,
                health_check_interval=30)
            self._client = aioredis.Redis.from_pool(pool)

    def table(self, name: str, bounds: Bounds, codec: Codec[T]) -> Table[T]:
        if self._client is None:
            table: MemoryTable[T] = MemoryTable(bounds)
            self.memory_tables[name] = (table, codec)
            return AsyncMemoryTable(table)
        from server.store.redis_table import RedisTable

        return RedisTable(self._client, name, bounds, codec, self._timeout_s)

    def leases(self, name: str) -> RedisLeases | None:
        """Keys one holder owns for a while (server.store.redis_leases) on a shared store;
        None with memory:// (one process: its own locks do)."""
        if self._client is None:
            return None
        from server.store.redis_leases import RedisLeases

        return RedisLeases(self._client, name, self._timeout_s)

    def exclusive(self, name: str) -> AbstractAsyncContextManager[None]:
        """Held by one replica at a time: a Redis lock (redis-py's) named `name` on a shared
        store, so a read-change-write of one record by two replicas cannot lose either
        change; nothing with memory:// (one process: its callers' own locks do). Waiting
        longer than twice the state timeout for it is StateUnavailable (a 503)."""
        if self._client is None:
            return contextlib.nullcontext()
        return self._redis_lock(name)

    @contextlib.asynccontextmanager
    async def _redis_lock(self, name: str) -> AsyncIterator[None]:
        from redis.exceptions import LockError, RedisError

        from server.store.bounds import StateUnavailable

        assert self._client is not None
        lock = self._client.lock(f"vlserve:lock:{name}", timeout=LOCK_LEASE_S, sleep=0.05,
                                 blocking_timeout=2 * self._timeout_s, thread_local=False)
        try:
            held = await lock.acquire(token=secrets.token_hex(16))
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"the shared state store did not answer ({exc})") from None
        if not held:
            raise StateUnavailable(f"{name} stayed locked by another replica for "
                                   f"{2 * self._timeout_s:g} s") from None
        try:
            yield
        finally:
            try:
                await lock.release()
            except (LockError, RedisError, OSError) as exc:  # it lapsed: the change is made
                logger.warning("lock %s not released: %s", name, exc)

    async def ping(self) -> None:
        """Raise StateUnavailable unless the shared store answers (memory always does)."""
        if self._client is not None:
            from server.store.redis_table import guarded

            await guarded(self._client.ping, self._timeout_s)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def open_backend(url: str, timeout_s: float = 5.0) -> StateBackend:
    return StateBackend(url, timeout_s)


def redacted(url: str) -> str:
    """The URL for logs: a password in it is not printed."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (
        f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()
