"""The async face every backend shows its users (uploads, stored responses, batches)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from server.store.bounds import Bounds, TableFull
from server.store.memory import MemoryTable

T = TypeVar("T")


@dataclass(frozen=True)
class Codec(Generic[T]):
    """How a record crosses the wire to a shared store: a small `head` that listings read
    and a `body` (large bytes, e.g. decoded pixels) read only by `get`. `decode` gets
    body=None for a listing. `heavy`: encode/decode off the event loop (big JSON)."""

    encode: Callable[[T], tuple[bytes, bytes]]
    decode: Callable[[bytes, bytes | None], T]
    heavy: bool = False


class Table(Protocol[T]):
    """A bounded per-owner table (server.store.bounds.Bounds); backends raise TableFull
    when a put is refused and StateUnavailable when the store cannot be reached.
    `bounds` may be replaced while it serves (the API keys' shares, re-split when the keys
    change): each call goes by those in force."""

    bounds: Bounds

    async def put(self, owner: str, key: str, value: T, size: int) -> None:
        """Keep `value` under `key`, replacing what the key held (e.g. a batch's status)."""
        ...

    async def get(self, owner: str, key: str) -> T | None: ...

    async def head(self, owner: str, key: str) -> T | None:
        """As get, without the body (decoded with body=None): what it holds is not read."""
        ...

    async def delete(self, owner: str, key: str) -> bool: ...

    async def heads(self, owner: str) -> list[T]:
        """The owner's entries, least recently used (or oldest) first, without bodies."""
        ...

    async def owner_usage(self, owner: str) -> tuple[int, int]: ...


class AsyncMemoryTable(Generic[T]):
    """A MemoryTable behind the async face: each call is a few dict operations under a
    lock, so it runs on the event loop as the single-box store always has."""

    def __init__(self, table: MemoryTable[T]) -> None:
        self.table = table

    @property
    def bounds(self) -> Bounds:
        return self.table.bounds

    @bounds.setter
    def bounds(self, bounds: Bounds) -> None:
        self.table.bounds = bounds

    async def put(self, owner: str, key: str, value: T, size: int) -> None:
        self.table.put(owner, key, value, size)

    async def get(self, owner: str, key: str) -> T | None:
        return self.table.get(owner, key)

    async def head(self, owner: str, key: str) -> T | None:
        return self.table.get(owner, key)  # the record as it is: there is nothing to read

    async def delete(self, owner: str, key: str) -> bool:
        return self.table.delete(owner, key)

    async def heads(self, owner: str) -> list[T]:
        return self.table.values(owner)

    async def owner_usage(self, owner: str) -> tuple[int, int]:
        return self.table.owner_usage(owner)


async def put_within_share(table: Table[T], bounds: Bounds, owner: str, key: str, value: T,
                           size: int) -> bool:
    """Keep a record (a stored response, a chat completion) unless it alone is over its
    owner's byte share: False, not kept. StateUnavailable when a shared table is out of
    reach."""
    if size > bounds.max_bytes_per_owner:
        return False
    try:
        await table.put(owner, key, value, size)
    except TableFull:  # only a shared table whose bounds changed under it
        return False
    return True
