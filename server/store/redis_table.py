"""A table in Redis, shared by every replica pointed at the same `state_url`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.store import redis_lua
from server.store.bounds import Bounds, StateUnavailable, TableFull
from server.store.table import Codec

T = TypeVar("T")
R = TypeVar("R")

# A body is read in pieces of this size (a copy each: ~0.1 ms), not in one of tens of MB.
BODY_PIECE_BYTES = 1 << 20


async def guarded(call: Callable[[], Awaitable[R]], timeout_s: float) -> R:
    """Run one Redis call; an unreachable or silent Redis is StateUnavailable, never a
    hang (the client's own socket timeouts, and this one over its retries)."""
    try:
        return await asyncio.wait_for(call(), timeout_s)
    except (RedisError, OSError, asyncio.TimeoutError) as exc:
        raise StateUnavailable(f"the shared state store did not answer ({type(exc).__name__}"
                               f": {exc})") from None


class RedisTable(Generic[T]):
    """Bounds enforced by the scripts in server.store.redis_lua, one atomic call each."""

    def __init__(self, client: aioredis.Redis, name: str, bounds: Bounds, codec: Codec[T],
                 timeout_s: float) -> None:
        self.bounds = bounds
        self._client = client
        self._prefix = f"vlserve:{name}:"
        self._codec = codec
        self._timeout_s = timeout_s
        self._ttl_ms = str(int(bounds.ttl_s * 1000))
        self._scripts = {name: client.register_script(getattr(redis_lua, name))
                         for name in ("PUT", "GET", "HEAD", "DELETE", "HEADS",
                                      "OWNER_USAGE")}

    async def put(self, owner: str, key: str, value: T, size: int) -> None:
        head, body = await self._run_codec(self._codec.encode, value)
        b = self.bounds
        kept = await self._script("PUT", key, owner, size, self._ttl_ms, b.max_count,
                                  b.max_bytes, b.max_count_per_owner, b.max_bytes_per_owner,
                                  int(b.lru), int(b.evict_others), head, body)
        if not kept:
            raise TableFull(f"the shared table {self._prefix!r} is full")

    async def get(self, owner: str, key: str) -> T | None:
        found = await self._script("GET", key, owner, self._ttl_ms, int(self.bounds.lru),
                                   BODY_PIECE_BYTES)
        if not found:
            return None
        head, pieces = found
        # A join this large lets go of the GIL for its copy: in a thread it stalls no one.
        body = pieces[0] if len(pieces) == 1 else (
            await asyncio.to_thread(b"".join, pieces) if pieces else b"")
        return await self._run_codec(self._codec.decode, head, body)

    async def head(self, owner: str, key: str) -> T | None:
        found = await self._script("HEAD", key, owner, self._ttl_ms, int(self.bounds.lru))
        if found is None:
            return None
        return await self._run_codec(self._codec.decode, found, None)

    async def delete(self, owner: str, key: str) -> bool:
        return bool(await self._script("DELETE", key, owner))

    async def heads(self, owner: str) -> list[T]:
        heads = await self._script("HEADS", owner, self._ttl_ms)
        return [self._codec.decode(head, None) for head in heads if head is not None]

    async def owner_usage(self, owner: str) -> tuple[int, int]:
        count, used = await self._script("OWNER_USAGE", owner, self._ttl_ms)
        return int(count), int(used)

    async def _script(self, name: str, *args: object) -> Any:
        script = self._scripts[name]
        return await guarded(lambda: script(keys=[self._prefix], args=list(args)),
                             self._timeout_s)

    async def _run_codec(self, fn: Callable[..., R], *args: Any) -> R:
        if self._codec.heavy:  # a conversation with images is megabytes of JSON
            return await asyncio.to_thread(fn, *args)
        return fn(*args)
