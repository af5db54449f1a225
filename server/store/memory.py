"""The in-process table: today's single-box store (objects kept as they are, no copies)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from server.store.bounds import Bounds, TableFull

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    key: str
    owner: str
    value: T
    size: int
    stored_at: float


class MemoryTable(Generic[T]):
    """Per-owner entries in use order plus one list of all in storing order (expiry and the
    table-wide eviction walk it). Expired entries vanish on access. Thread-safe: the event
    loop and worker threads both call it, each call a few dict operations. `changes` counts
    the writes, deletes and use-order moves (a snapshot is written only when it moved;
    expiry does not count: a snapshot's expired entries are dropped when it is read)."""

    def __init__(self, bounds: Bounds, clock: Callable[[], float] = time.time) -> None:
        self.bounds = bounds
        self._clock = clock
        self._all: OrderedDict[str, _Entry[T]] = OrderedDict()  # stored first, first
        self._owners: dict[str, OrderedDict[str, _Entry[T]]] = {}
        self._owner_bytes: dict[str, int] = {}
        self._used = 0
        self._lock = threading.Lock()
        self.changes = 0
        # Told of each delete (not evictions or expiry): server.store.deletions.
        self.on_delete: Callable[[str, str], None] | None = None

    def put(self, owner: str, key: str, value: T, size: int) -> None:
        """Keep `value`, evicting as Bounds says; raises TableFull when it cannot. A key
        already held is replaced (a record updated in place: its TTL starts again)."""
        b = self.bounds
        with self._lock:
            self._expire()
            if key in self._all:
                self._remove(self._all[key])
            mine = self._owners.setdefault(owner, OrderedDict())

            def full() -> bool:
                return len(self._all) + 1 > b.max_count or self._used + size > b.max_bytes

            while mine and (len(mine) + 1 > b.max_count_per_owner
                            or self._owner_bytes.get(owner, 0) + size > b.max_bytes_per_owner
                            or (not b.evict_others and full())):
                self._remove(next(iter(mine.values())))
            while b.evict_others and self._all and full():
                self._remove(next(iter(self._all.values())))
            if full():
                raise TableFull(f"the table holds {len(self._all)} entries, {self._used} bytes")
            entry = _Entry(key, owner, value, size, self._clock())
            mine[key] = entry
            self._all[key] = entry
            self._owner_bytes[owner] = self._owner_bytes.get(owner, 0) + size
            self._used += size
            self.changes += 1

    def get(self, owner: str, key: str) -> T | None:
        with self._lock:
            self._expire()
            mine = self._owners.get(owner)
            entry = mine.get(key) if mine else None
            if mine is None or entry is None:
                return None
            if self.bounds.lru and next(reversed(mine)) != key:
                mine.move_to_end(key)
                self.changes += 1
            return entry.value

    def entries(self) -> list[_Entry[T]]:
        """Every live entry, oldest first (server.store.snapshot)."""
        with self._lock:
            self._expire()
            return list(self._all.values())

    def contents(self) -> tuple[list[_Entry[T]], dict[str, list[str]]]:
        """Every live entry, oldest first, and each owner's keys in use order (least
        recently used first), read at one moment (server.store.snapshot)."""
        with self._lock:
            self._expire()
            return list(self._all.values()), {owner: list(mine)
                                              for owner, mine in self._owners.items() if mine}

    def arrange(self, owner: str, keys: list[str]) -> None:
        """Put the owner's entries in this use order (a snapshot's, restored by storing
        order); keys not held are ignored, entries not named stay least recently used."""
        with self._lock:
            mine = self._owners.get(owner)
            if mine is None:
                return
            for key in keys:
                if isinstance(key, str) and key in mine:  # a bad snapshot's is skipped
                    mine.move_to_end(key)

    def restore(self, owner: str, key: str, value: T, size: int, stored_at: float) -> bool:
        """Put back an entry from a snapshot with its age (restored oldest first, as the
        TTL walk expects); False when it expired meanwhile or no longer fits."""
        b = self.bounds
        if stored_at < self._clock() - b.ttl_s or size > min(b.max_bytes_per_owner,
                                                              b.max_bytes):
            return False  # expired, or over today's bounds (it would push others out)
        try:
            self.put(owner, key, value, size)
        except TableFull:
            return False
        with self._lock:
            entry = self._all.get(key)
            if entry is not None:
                entry.stored_at = stored_at
        return True

    def empty(self) -> MemoryTable[T]:
        """A new table with the same bounds and clock (a snapshot is read into one)."""
        return MemoryTable(self.bounds, self._clock)

    def absorb(self, older: MemoryTable[T]) -> int:
        """Take in `older`'s entries (a snapshot read while this table may be in use) but
        those this one holds: ours win. Theirs go behind ours in each
        owner's use order (LRU tables; in the others each owner's order stays by age, as
        its oldest goes first); those that do not fit beside ours within the bounds are left
        out, the newest taken first. The entries taken."""
        theirs, orders = older.contents()
        b = self.bounds
        with self._lock:
            self._expire()
            count, used = len(self._all), self._used
            owner_count = {owner: len(mine) for owner, mine in self._owners.items()}
            owner_bytes = dict(self._owner_bytes)
            taken: dict[str, _Entry[T]] = {}
            for entry in reversed(theirs):  # newest first: the oldest are left out
                owner = entry.owner
                if (entry.key in self._all
                        or count + 1 > b.max_count or used + entry.size > b.max_bytes
                        or owner_count.get(owner, 0) + 1 > b.max_count_per_owner
                        or owner_bytes.get(owner, 0) + entry.size > b.max_bytes_per_owner):
                    continue
                taken[entry.key] = entry
                count, used = count + 1, used + entry.size
                owner_count[owner] = owner_count.get(owner, 0) + 1
                owner_bytes[owner] = owner_bytes.get(owner, 0) + entry.size
            if not taken:
                return 0
            # One storing order by age: expiry and the table-wide eviction walk it.
            self._all = OrderedDict(sorted([*taken.items(), *self._all.items()],
                                           key=lambda item: item[1].stored_at))
            for owner, keys in orders.items():
                behind = OrderedDict((key, taken[key]) for key in keys if key in taken)
                if behind:
                    behind.update(self._owners.get(owner, {}))
                    if not b.lru:  # storing order: each owner's oldest goes first
                        behind = OrderedDict(sorted(behind.items(),
                                                    key=lambda item: item[1].stored_at))
                    self._owners[owner] = behind
            self._owner_bytes, self._used = owner_bytes, used
            self.changes += 1
            return len(taken)

    def delete(self, owner: str, key: str) -> bool:
        with self._lock:
            mine = self._owners.get(owner)
            entry = mine.get(key) if mine else None
            if entry is None:
                return False
            self._remove(entry)
            self.changes += 1
        if self.on_delete is not None:
            self.on_delete(owner, key)
        return True

    def values(self, owner: str) -> list[T]:
        """The owner's entries, least recently used (or oldest) first."""
        with self._lock:
            self._expire()
            return [e.value for e in self._owners.get(owner, {}).values()]

    def owner_usage(self, owner: str) -> tuple[int, int]:
        """(entries, bytes) held for `owner`."""
        with self._lock:
            return len(self._owners.get(owner, ())), self._owner_bytes.get(owner, 0)

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) held in all."""
        with self._lock:
            return len(self._all), self._used

    def _remove(self, entry: _Entry[T]) -> None:
        del self._owners[entry.owner][entry.key]  # an emptied owner's dict stays: one per key
        del self._all[entry.key]
        self._owner_bytes[entry.owner] -= entry.size
        self._used -= entry.size

    def _expire(self) -> None:
        cutoff = self._clock() - self.bounds.ttl_s
        while self._all:
            oldest = next(iter(self._all.values()))
            if oldest.stored_at >= cutoff:
                return
            self._remove(oldest)
