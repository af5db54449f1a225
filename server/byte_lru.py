"""A least-recently-used map bounded by the bytes of its values (the image caches' shape)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """Evicts the least recently used values past `max_bytes` (`size` says what a value
    weighs); counts hits and misses. Not thread-safe: callers that share one lock it."""

    def __init__(self, max_bytes: int, size: Callable[[V], int]) -> None:
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self._size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: K, value: V) -> None:
        weight = self._size(value)
        if weight > self.max_bytes:
            return  # larger than the whole budget (or a budget of 0: the cache is off)
        old = self._items.pop(key, None)
        if old is not None:
            self.used_bytes -= self._size(old)
        self._items[key] = value
        self.used_bytes += weight
        while self.used_bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.used_bytes -= self._size(evicted)
