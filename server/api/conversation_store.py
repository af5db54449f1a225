"""Conversations (POST /conversations, `conversation` on /responses): each one's items in
order, bounded in count and bytes per API key and in all, in memory or in the shared store
(server.store). A conversation not written for `conversations_ttl_s` goes; an owner over its
share loses its least recently used conversation first. A key sees only its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any

from server.api.json_pages import encoded, lines
from server.api.responses_input import new_id
from server.api.stored_items import (
    StoredItem,
    item_lines,
    items_from_lines,
    items_size,
    stored_items,
)
from server.config import Settings
from server.store import Bounds, Codec, StateBackend, Table, TableFull


@dataclass(frozen=True)
class StoredConversation:
    id: str
    owner: str  # the client identity (server.api.auth.client_identity) that created it
    created_at: int
    metadata: dict[str, str]
    # Input items as listed (each with an id), oldest first, each its JSON
    # (server.api.stored_items).
    items: list[StoredItem]
    size: int  # bytes of JSON, what the byte bounds count

    def view(self) -> dict[str, Any]:
        """The conversation object (OpenAI's shape; its items are listed separately)."""
        return {"id": self.id, "object": "conversation", "created_at": self.created_at,
                "metadata": self.metadata}


class ConversationFull(Exception):
    """The conversation would outgrow its owner's whole byte share."""


def json_size(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":")))


def new_conversation(owner: str, metadata: dict[str, str],
                     items: list[StoredItem]) -> StoredConversation:
    conversation_id = f"conv_{secrets.token_hex(24)}"
    empty = StoredConversation(conversation_id, owner, int(time.time()), metadata, [],
                               json_size(metadata))
    return appended(empty, items)


def duplicate_item(held: list[StoredItem], ids: list[str]) -> tuple[int, str] | None:
    """(index, id) of the first of `ids` already held (or repeating an earlier one of
    them): OpenAI refuses such an item; lookups and cursors go by id."""
    taken = {item.id for item in held}
    for index, item_id in enumerate(ids):
        if item_id in taken:
            return index, item_id
        taken.add(item_id)
    return None


def appended(conversation: StoredConversation,
             items: list[StoredItem]) -> StoredConversation:
    """The conversation with `items` at its end, each id unique in it (the routes refuse a
    duplicate first, duplicate_item; one that got in meanwhile gets a new id, so is
    encoded again: call it off the event loop)."""
    taken = {item.id for item in conversation.items}
    fresh: list[StoredItem] = []
    for item in items:
        if item.id in taken:
            value = json.loads(bytes(item.json))
            value["id"] = new_id(item.id.partition("_")[0] or "item")
            item = StoredItem(value["id"], encoded(value))
        taken.add(item.id)
        fresh.append(item)
    return replace(conversation, items=conversation.items + fresh,
                   size=conversation.size + sum(len(item.json) for item in fresh))


def with_metadata(conversation: StoredConversation,
                  metadata: dict[str, str]) -> StoredConversation:
    return replace(conversation, metadata=metadata, size=conversation.size
                   - json_size(conversation.metadata) + json_size(metadata))


def without_item(conversation: StoredConversation, item_id: str) -> StoredConversation:
    """The conversation less its item `item_id`; KeyError when it holds none."""
    for index, item in enumerate(conversation.items):
        if item.id == item_id:
            return replace(conversation,
                           items=conversation.items[:index] + conversation.items[index + 1:],
                           size=conversation.size - len(item.json))
    raise KeyError(item_id)


class Conversations:
    """The conversation store as the routes use it: async, in memory or shared. A change
    reads the record, changes it and writes it back whole, one change at a time per
    conversation: in this process by a lock of its own, among replicas sharing a store by
    the store's lock too (StateBackend.exclusive). (One response at a time runs on a
    conversation, among replicas too: server.api.conversation_locks.)"""

    def __init__(self, table: Table[StoredConversation], bounds: Bounds,
                 exclusive: Callable[[str], AbstractAsyncContextManager[None]]) -> None:
        self.table = table
        self.bounds = bounds
        self._exclusive = exclusive
        self._changing: dict[str, tuple[asyncio.Lock, int]] = {}

    async def put(self, conversation: StoredConversation) -> None:
        """Keep `conversation` (new or changed). ConversationFull when it alone is over its
        owner's byte share; StateUnavailable when the shared store is out of reach."""
        if conversation.size > self.bounds.max_bytes_per_owner:
            raise ConversationFull(f"{conversation.size} bytes, over the "
                                   f"{self.bounds.max_bytes_per_owner} bytes kept per key")
        try:
            await self.table.put(conversation.owner, conversation.id, conversation,
                                 conversation.size)
        except TableFull as exc:  # only a shared table whose bounds changed under it
            raise ConversationFull(str(exc)) from exc

    async def get(self, conversation_id: str, owner: str) -> StoredConversation | None:
        return await self.table.get(owner, conversation_id)

    async def delete(self, conversation_id: str, owner: str) -> bool:
        async with self._one_change(conversation_id):  # a change under way cannot undo it
            return await self.table.delete(owner, conversation_id)

    async def change(self, conversation_id: str, owner: str,
                     how: Callable[[StoredConversation], StoredConversation]
                     ) -> StoredConversation | None:
        """Apply `how` to the conversation as it is now and keep the result (None: it is
        gone). `how` runs in a worker thread: it may encode items that hold images."""
        async with self._one_change(conversation_id):
            current = await self.get(conversation_id, owner)
            if current is None:
                return None
            changed = await asyncio.to_thread(how, current)
            await self.put(changed)
            return changed

    async def append(self, conversation_id: str, owner: str,
                     items: list[StoredItem]) -> StoredConversation | None:
        """Add `items` at the end of the conversation as it is now (None: it is gone)."""
        return await self.change(conversation_id, owner, lambda c: appended(c, items))

    @contextlib.asynccontextmanager
    async def _one_change(self, conversation_id: str) -> AsyncIterator[None]:
        lock, users = self._changing.get(conversation_id, (asyncio.Lock(), 0))
        self._changing[conversation_id] = (lock, users + 1)
        try:
            # This process's lock first: its own changes queue here, not on the store.
            async with lock, self._exclusive(f"conversation:{conversation_id}"):
                yield
        finally:
            lock, users = self._changing[conversation_id]
            if users == 1:
                del self._changing[conversation_id]
            else:
                self._changing[conversation_id] = (lock, users - 1)


def conversation_bounds(settings: Settings, keys: int | None = None) -> Bounds:
    """Each API key (of the configured ones, or of `keys`) gets an even share, so no key can
    push another's conversations out; within a share the least recently used conversation
    goes first."""
    keys = max(1, len(settings.api_keys) if keys is None else keys)
    max_bytes = settings.conversations_store_mb * 1024 * 1024
    return Bounds(settings.conversations_max_stored, max_bytes, settings.conversations_ttl_s,
                  max(1, settings.conversations_max_stored // keys), max(1, max_bytes // keys),
                  lru=True, evict_others=True)


def _encode(entry: StoredConversation) -> tuple[bytes, bytes]:
    # The head: its fields and its items' ids; the body: the items, one JSON value a line,
    # read back as they are (json_pages.lines), not parsed.
    return (encoded([entry.id, entry.owner, entry.created_at, entry.metadata,
                     [item.id for item in entry.items], entry.size]),
            item_lines(entry.items))


def _decode(head: bytes, body: bytes | None) -> StoredConversation:
    conversation_id, owner, created_at, metadata, items, size = json.loads(head)
    if items and isinstance(items[0], dict):  # an earlier version's: the items themselves
        held = stored_items(items)
        # Counted anew: it counted them escaped (ensure_ascii), so deleting one (counted
        # as stored now) would leave bytes behind that no item holds.
        size = json_size(metadata) + items_size(held)
    else:
        found = lines(body) if body else []
        if len(found) != len(items):
            # Its body lost (evicted from Redis): the record is kept empty rather than a
            # 500, its size with it.
            held, size = [], json_size(metadata)
        else:
            held = items_from_lines(items, found)
    return StoredConversation(conversation_id, owner, created_at, metadata, held, size)


# Heavy: a conversation's items are megabytes of JSON (images), copied off-loop.
CONVERSATION_CODEC: Codec[StoredConversation] = Codec(_encode, _decode, heavy=True)


def open_conversations(settings: Settings, backend: StateBackend) -> Conversations:
    """The routes' conversation store, where `state_url` says."""
    bounds = conversation_bounds(settings)
    return Conversations(backend.table("conversations", bounds, CONVERSATION_CODEC), bounds,
                         backend.exclusive)
