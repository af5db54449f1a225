"""Stored responses (`store: true`), kept in memory: bounded in count and bytes, per API key
and in all, expiring after a TTL. A key sees only its own responses; `previous_response_id`
reads the conversation back from here."""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.config import Settings


@dataclass(frozen=True)
class StoredResponse:
    id: str
    owner: str  # the client identity (server.api.auth.client_identity) that created it
    response: dict[str, Any]  # the response object as it was answered
    input_items: list[dict[str, Any]]  # this request's input items, each with an id
    # Every item of the conversation so far, earlier turns, this input and this output, as
    # input items: what a request naming this response as its previous one continues.
    conversation: list[dict[str, Any]]
    size: int  # bytes of JSON, what the byte bounds count


def stored_response(response: dict[str, Any], owner: str, input_items: list[dict[str, Any]],
                    conversation: list[dict[str, Any]]) -> StoredResponse:
    size = sum(len(json.dumps(part, separators=(",", ":")))
               for part in (response, input_items, conversation))
    return StoredResponse(response["id"], owner, response, input_items, conversation, size)


class ResponseStore:
    """Per owner, oldest first out: an owner's new response evicts that owner's oldest ones
    when over its share; the store's own bounds, if the shares add up to more, evict the
    oldest of all. Expired responses vanish on access."""

    def __init__(self, max_count: int, max_bytes: int, ttl_s: float, *,
                 max_count_per_owner: int | None = None, max_bytes_per_owner: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.max_count_per_owner = min(max_count_per_owner or max_count, max_count)
        self.max_bytes_per_owner = min(max_bytes_per_owner or max_bytes, max_bytes)
        self._clock = clock
        self._all: OrderedDict[str, StoredResponse] = OrderedDict()  # oldest first
        self._owners: dict[str, OrderedDict[str, StoredResponse]] = {}
        self._owner_bytes: dict[str, int] = {}
        self._stored_at: dict[str, float] = {}  # by the store's clock, for the TTL
        self._used = 0
        self._lock = threading.Lock()

    def add(self, entry: StoredResponse) -> bool:
        """Keep `entry`; False when it alone is over the owner's byte share (not kept)."""
        if entry.size > self.max_bytes_per_owner:
            return False
        with self._lock:
            self._expire()
            mine = self._owners.setdefault(entry.owner, OrderedDict())
            while mine and (len(mine) + 1 > self.max_count_per_owner or self._owner_bytes.get(
                    entry.owner, 0) + entry.size > self.max_bytes_per_owner):
                self._remove(next(iter(mine.values())))
            while self._all and (len(self._all) + 1 > self.max_count
                                 or self._used + entry.size > self.max_bytes):
                self._remove(next(iter(self._all.values())))
            mine[entry.id] = entry
            self._all[entry.id] = entry
            self._stored_at[entry.id] = self._clock()
            self._owner_bytes[entry.owner] = self._owner_bytes.get(entry.owner, 0) + entry.size
            self._used += entry.size
        return True

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        with self._lock:
            self._expire()
            mine = self._owners.get(owner)
            return mine.get(response_id) if mine else None

    def delete(self, response_id: str, owner: str) -> bool:
        with self._lock:
            mine = self._owners.get(owner)
            entry = mine.get(response_id) if mine else None
            if entry is None:
                return False
            self._remove(entry)
            return True

    def usage(self) -> tuple[int, int]:
        """(responses, bytes) held."""
        with self._lock:
            return len(self._all), self._used

    def _remove(self, entry: StoredResponse) -> None:
        del self._owners[entry.owner][entry.id]
        del self._all[entry.id]
        del self._stored_at[entry.id]
        self._owner_bytes[entry.owner] -= entry.size
        self._used -= entry.size

    def _expire(self) -> None:
        cutoff = self._clock() - self.ttl_s
        while self._all:
            oldest = next(iter(self._all.values()))  # stored first, so expires first
            if self._stored_at[oldest.id] >= cutoff:
                return
            self._remove(oldest)


def response_store(settings: Settings) -> ResponseStore:
    """The store the settings describe; each API key gets an even share of it, so no key
    can push another's responses out."""
    keys = max(1, len(settings.api_keys))
    return ResponseStore(settings.responses_max_stored, settings.responses_store_mb * 1024 * 1024,
                         settings.responses_ttl_s,
                         max_count_per_owner=max(1, settings.responses_max_stored // keys),
                         max_bytes_per_owner=max(1, settings.responses_store_mb * 1024 * 1024
                                                 // keys))
