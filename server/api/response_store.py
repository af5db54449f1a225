"""Stored responses (`store: true`): bounded in count and bytes, per API key and in all,
expiring after a TTL, in memory or in the shared store (server.store). A key sees only its
own responses; `previous_response_id` reads the conversation back from here."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.api.json_pages import encoded, lines
from server.api.stored_items import (
    StoredItem,
    item_lines,
    items_from_lines,
    items_size,
    stored_items,
)
from server.config import Settings
from server.store import Bounds, Codec, StateBackend, Table, put_within_share
from server.store.memory import MemoryTable


@dataclass(frozen=True)
class StoredResponse:
    """Kept as the JSON it is answered with, encoded once when stored: a retrieve sends
    those bytes, and a Python copy of a response with logprobs would take ~5x its JSON's
    size (the byte bounds count the JSON). Its items are kept as the JSON they are listed
    as (server.api.stored_items); from the shared store they are its record's body, which
    a retrieve does not read."""

    id: str
    owner: str  # the client identity (server.api.auth.client_identity) that created it
    response_json: bytes  # the response object as it was answered
    # What the routes look at, without decoding the response.
    status: str | None
    background: bool
    # This request's input items, each with an id; None when read without them (`head`).
    input_items: list[StoredItem] | None
    # Every item of the conversation so far, earlier turns, this input and this output, as
    # input items: what a request naming this response as its previous one continues.
    conversation: list[StoredItem] | None
    size: int  # bytes of JSON, what the byte bounds count

    def response(self) -> dict[str, Any]:
        """The response object (a decode: off the event loop, it may be megabytes)."""
        value: dict[str, Any] = json.loads(self.response_json)
        return value


def _entry(response_id: str, owner: str, response_json: bytes, fields: dict[str, Any],
           input_items: list[StoredItem] | None, conversation: list[StoredItem] | None,
           size: int) -> StoredResponse:
    return StoredResponse(response_id, owner, response_json, fields.get("status"),
                          bool(fields.get("background")), input_items, conversation, size)


def stored_response(response: dict[str, Any], owner: str, input_items: list[StoredItem],
                    conversation: list[StoredItem]) -> StoredResponse:
    """The record for `response` (call it off the event loop: it encodes the response)."""
    response_json = encoded(response)
    size = len(response_json) + items_size(input_items) + items_size(conversation)
    return _entry(response["id"], owner, response_json, response, input_items, conversation,
                  size)


def with_output(response: dict[str, Any], owner: str, input_items: list[StoredItem],
                conversation: list[StoredItem], output: list[dict[str, Any]]
                ) -> StoredResponse:
    """The record for `response`, its output items encoded onto `conversation` (off the
    event loop)."""
    return stored_response(response, owner, input_items, conversation + stored_items(output))


def restated(entry: StoredResponse, **changes: Any) -> StoredResponse:
    """`entry` with `changes` made to its response object (off the event loop: a decode
    and an encode; its state changes while it runs, when its output is still small)."""
    response = {**entry.response(), **changes}
    response_json = encoded(response)
    return _entry(entry.id, entry.owner, response_json, response,
                  entry.input_items, entry.conversation,
                  entry.size - len(entry.response_json) + len(response_json))


def _bounds(max_count: int, max_bytes: int, ttl_s: float, max_count_per_owner: int | None,
            max_bytes_per_owner: int | None) -> Bounds:
    # Oldest first out, per owner; past the store's own bounds the oldest of all go.
    return Bounds(max_count, max_bytes, ttl_s,
                  min(max_count_per_owner or max_count, max_count),
                  min(max_bytes_per_owner or max_bytes, max_bytes),
                  lru=False, evict_others=True)


class ResponseStore:
    """Per owner, oldest first out: an owner's new response evicts that owner's oldest ones
    when over its share; the store's own bounds, if the shares add up to more, evict the
    oldest of all. Expired responses vanish on access. The in-memory store, called
    synchronously; the routes use `Responses`, its async face over either backend."""

    def __init__(self, max_count: int, max_bytes: int, ttl_s: float, *,
                 max_count_per_owner: int | None = None, max_bytes_per_owner: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.bounds = _bounds(max_count, max_bytes, ttl_s, max_count_per_owner,
                              max_bytes_per_owner)
        self.table: MemoryTable[StoredResponse] = MemoryTable(self.bounds, clock)

    @property
    def max_count_per_owner(self) -> int:
        return self.bounds.max_count_per_owner

    @property
    def max_bytes_per_owner(self) -> int:
        return self.bounds.max_bytes_per_owner

    def add(self, entry: StoredResponse) -> bool:
        """Keep `entry`; False when it alone is over the owner's byte share (not kept)."""
        if entry.size > self.bounds.max_bytes_per_owner:
            return False
        self.table.put(entry.owner, entry.id, entry, entry.size)  # evicts others: never full
        return True

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        return self.table.get(owner, response_id)

    def delete(self, response_id: str, owner: str) -> bool:
        return self.table.delete(owner, response_id)

    def usage(self) -> tuple[int, int]:
        """(responses, bytes) held."""
        return self.table.usage()


class Responses:
    """The response store as the routes use it: async, in memory or shared."""

    def __init__(self, table: Table[StoredResponse], bounds: Bounds) -> None:
        self.table = table
        self.bounds = bounds

    async def add(self, entry: StoredResponse) -> bool:
        """As ResponseStore.add; StateUnavailable when the shared store is out of reach."""
        return await put_within_share(self.table, self.bounds, entry.owner, entry.id, entry,
                                      entry.size)

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        return await self.table.get(owner, response_id)

    async def head(self, response_id: str, owner: str) -> StoredResponse | None:
        """The response without its items (which the shared store then does not read)."""
        return await self.table.head(owner, response_id)

    async def delete(self, response_id: str, owner: str) -> bool:
        return await self.table.delete(owner, response_id)


def _encode(entry: StoredResponse) -> tuple[bytes, bytes]:
    # The head: a line of its fields and items' ids, then the response's JSON as it is (a
    # read copies it out, not a parse); the body, read only when the items are asked for:
    # the input items, then the conversation's, one JSON value a line.
    assert entry.input_items is not None and entry.conversation is not None
    fields = [entry.id, entry.owner, entry.status, entry.background,
              [i.id for i in entry.input_items], [i.id for i in entry.conversation],
              entry.size]
    return encoded(fields) + b"\n" + entry.response_json, \
        item_lines(entry.input_items + entry.conversation)


def _decode(head: bytes, body: bytes | None) -> StoredResponse:
    cut = head.find(b"\n")  # compact JSON holds no raw newline: one value, or two lines
    if cut < 0:
        # Stored by an earlier version: the response object inside the head's one value.
        response_id, owner, response, input_ids, conversation_ids, size = json.loads(head)
        response_json, fields = encoded(response), response
    else:
        response_id, owner, status, background, input_ids, conversation_ids, size = \
            json.loads(head[:cut])
        response_json, fields = head[cut + 1:], {"status": status, "background": background}
    if any(isinstance(item, dict) for item in input_ids[:1] + conversation_ids[:1]):
        # Stored by an earlier version: the items themselves, in the head (no body).
        return _entry(response_id, owner, response_json, fields, stored_items(input_ids),
                      stored_items(conversation_ids), size)
    found = lines(body) if body else []
    if body is None or len(found) != len(input_ids) + len(conversation_ids):
        # Read without its body, or its body lost (evicted from Redis): no items.
        return _entry(response_id, owner, response_json, fields, None, None, size)
    cut = len(input_ids)
    return _entry(response_id, owner, response_json, fields,
                  items_from_lines(input_ids, found[:cut]),
                  items_from_lines(conversation_ids, found[cut:]), size)


# Heavy: a response's head may hold megabytes of logprobs, its body images: off-loop.
RESPONSE_CODEC: Codec[StoredResponse] = Codec(_encode, _decode, heavy=True)


def response_store(settings: Settings, keys: int | None = None) -> ResponseStore:
    """The store the settings describe; each API key (of the configured ones, or of `keys`)
    gets an even share of it, so no key can push another's responses out."""
    keys = max(1, len(settings.api_keys) if keys is None else keys)
    return ResponseStore(settings.responses_max_stored, settings.responses_store_mb * 1024 * 1024,
                         settings.responses_ttl_s,
                         max_count_per_owner=max(1, settings.responses_max_stored // keys),
                         max_bytes_per_owner=max(1, settings.responses_store_mb * 1024 * 1024
                                                 // keys))


def open_responses(settings: Settings, backend: StateBackend) -> Responses:
    """The routes' response store, with response_store's bounds, where `state_url` says."""
    bounds = response_store(settings).bounds
    return Responses(backend.table("responses", bounds, RESPONSE_CODEC), bounds)
