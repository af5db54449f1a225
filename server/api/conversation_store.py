"""Conversations (POST /conversations, `conversation` on /responses): each one's items in
order, bounded in count and bytes per API key and in all, in memory or in the shared store
(server.store). A conversation not written for `conversations_ttl_s` goes; an owner over its
share loses its least recently used conversation first. A key sees only its own."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

from server.config import Settings
from server.store import Bounds, Codec, StateBackend, Table, TableFull


@dataclass(frozen=True)
class StoredConversation:
    id: str
    owner: str  # the client identity (server.api.auth.client_identity) that created it
    created_at: int
    metadata: dict[str, str]
    items: list[dict[str, Any]]  # input items as listed (each with an id), oldest first
    size: int  # bytes of JSON, what the byte bounds count

    def view(self) -> dict[str, Any]:
        """The conversation object (OpenAI's shape; its items are listed separately)."""
        return {"id": self.id, "object": "conversation", "created_at": self.created_at,
                "metadata": self.metadata}


class ConversationFull(Exception):
    """The conversation would outgrow its owner's whole byte share."""


def json_size(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":")))


def items_size(items: list[dict[str, Any]]) -> int:
    """What `items` add to a conversation's size (JSON; off the event loop when they may
    hold images)."""
    return sum(json_size(item) for item in items)


def new_conversation(owner: str, metadata: dict[str, str],
                     items: list[dict[str, Any]]) -> StoredConversation:
    conversation_id = f"conv_{secrets.token_hex(24)}"
    return StoredConversation(conversation_id, owner, int(time.time()), metadata, items,
                              json_size(metadata) + items_size(items))


def with_metadata(conversation: StoredConversation,
                  metadata: dict[str, str]) -> StoredConversation:
    return replace(conversation, metadata=metadata, size=conversation.size
                   - json_size(conversation.metadata) + json_size(metadata))


def without_item(conversation: StoredConversation, item_id: str) -> StoredConversation | None:
    """The conversation less its item `item_id` (None: it holds no such item)."""
    for index, item in enumerate(conversation.items):
        if item["id"] == item_id:
            return replace(conversation,
                           items=conversation.items[:index] + conversation.items[index + 1:],
                           size=conversation.size - json_size(item))
    return None


class Conversations:
    """The conversation store as the routes use it: async, in memory or shared. Writes
    replace the whole record: on the single-box store a read and the write after it run
    without a pause between them on the event loop, so appends never lose each other; on a
    shared store two replicas appending to one conversation at once can (one response at a
    time runs on a conversation per replica: server.api.conversations.ConversationLocks)."""

    def __init__(self, table: Table[StoredConversation], bounds: Bounds) -> None:
        self.table = table
        self.bounds = bounds

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
        return await self.table.delete(owner, conversation_id)

    async def append(self, conversation_id: str, owner: str, items: list[dict[str, Any]],
                     size: int) -> StoredConversation | None:
        """Add `items` (`size`: their items_size) at the end of the conversation as it is
        now (None: it is gone)."""
        current = await self.get(conversation_id, owner)
        if current is None:
            return None
        grown = replace(current, items=current.items + items, size=current.size + size)
        await self.put(grown)
        return grown


def conversation_bounds(settings: Settings) -> Bounds:
    """Each API key gets an even share, so no key can push another's conversations out;
    within a share the least recently used conversation goes first."""
    keys = max(1, len(settings.api_keys))
    max_bytes = settings.conversations_store_mb * 1024 * 1024
    return Bounds(settings.conversations_max_stored, max_bytes, settings.conversations_ttl_s,
                  max(1, settings.conversations_max_stored // keys), max(1, max_bytes // keys),
                  lru=True, evict_others=True)


def _encode(entry: StoredConversation) -> tuple[bytes, bytes]:
    return json.dumps([entry.id, entry.owner, entry.created_at, entry.metadata, entry.items,
                       entry.size], separators=(",", ":")).encode(), b""


def _decode(head: bytes, _: bytes | None) -> StoredConversation:
    return StoredConversation(*json.loads(head))


# Heavy: a conversation with images inlined is megabytes of JSON, (de)serialised off-loop.
CONVERSATION_CODEC: Codec[StoredConversation] = Codec(_encode, _decode, heavy=True)


def open_conversations(settings: Settings, backend: StateBackend) -> Conversations:
    """The routes' conversation store, where `state_url` says."""
    bounds = conversation_bounds(settings)
    return Conversations(backend.table("conversations", bounds, CONVERSATION_CODEC), bounds)
