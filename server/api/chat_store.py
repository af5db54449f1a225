"""Stored chat completions (`store: true` on POST /chat/completions): the completion as
answered, the request's messages and its metadata, bounded in count and bytes per API key
and in all, oldest first out, expiring after a TTL, in memory or in the shared store
(server.store). A key sees only its own."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any

from server.api.json_pages import Buffer, Parts, encoded, lines, with_member
from server.api.protocol import ChatMessageIn
from server.config import Settings
from server.store import Bounds, Codec, StateBackend, Table, put_within_share


@dataclass(frozen=True)
class StoredChat:
    """Its answers are kept as the JSON they are sent as, encoded once when stored: pages are
    spliced from it (server.api.json_pages), never decoded and encoded again."""

    id: str
    owner: str  # the client identity (server.api.auth.client_identity) that created it
    created: int
    model: str  # the completion's, which listings filter by
    metadata: dict[str, str]
    completion: Buffer  # the chat.completion as answered, without metadata: JSON
    # The request's messages as listed (StoredMessage, each with its id), each its JSON;
    # None when read without them (a listing, a retrieve: they are images, mostly).
    messages: list[Buffer] | None
    size: int  # bytes of JSON, what the byte bounds count

    def view(self) -> Parts:
        """The stored chat.completion, as GET /chat/completions/{id} answers it."""
        return with_member(self.completion, "metadata", self.metadata)


def stored_chat(completion: dict[str, Any], owner: str, metadata: dict[str, str],
                messages: list[ChatMessageIn]) -> StoredChat:
    """The record for `completion` (call it off the event loop: it encodes the messages'
    images, once)."""
    answered = encoded({k: v for k, v in completion.items() if k != "metadata"})
    listed = [encoded(message) for message in stored_messages(completion["id"], messages)]
    size = len(answered) + len(encoded(metadata)) + sum(len(m) for m in listed)
    return StoredChat(completion["id"], owner, completion["created"], completion["model"],
                      metadata, answered, listed, size)


def stored_messages(completion_id: str, messages: list[ChatMessageIn]) -> list[dict[str, Any]]:
    """The request's messages as OpenAI lists a stored completion's: ids
    `<completion id>-<index>` (stable: a message's place in the request), a list content's
    parts in `content_parts` and its text joined in `content`."""
    out = []
    for index, message in enumerate(messages):
        sent = message.model_dump(exclude_none=True)
        parts = sent.pop("content", None)
        listed: dict[str, Any] = {"id": f"{completion_id}-{index}", "role": sent.pop("role"),
                                  "content": parts, "name": sent.pop("name", None),
                                  "content_parts": None}
        if isinstance(parts, list):
            texts = [part["text"] for part in parts if part["type"] == "text"]
            listed.update(content="\n".join(texts) if texts else None, content_parts=parts)
        out.append({**listed, **sent})  # tool_calls, tool_call_id, function_call
    return out


def chat_store_bounds(settings: Settings, keys: int | None = None) -> Bounds:
    """Each API key (of the configured ones, or of `keys`) gets an even share, so no key can
    push another's completions out; within a share (and past the store's own bounds) the
    oldest go first."""
    keys = max(1, len(settings.api_keys) if keys is None else keys)
    max_bytes = settings.chat_completions_store_mb * 1024 * 1024
    return Bounds(settings.chat_completions_max_stored, max_bytes,
                  settings.chat_completions_ttl_s,
                  max(1, settings.chat_completions_max_stored // keys),
                  max(1, max_bytes // keys), lru=False, evict_others=True)


class StoredChatFull(Exception):
    """The completion with its new metadata would be over its owner's whole byte share."""


class ChatStore:
    """The stored chat completions as the routes use them: async, in memory or shared."""

    def __init__(self, table: Table[StoredChat], bounds: Bounds,
                 exclusive: Callable[[str], AbstractAsyncContextManager[None]]) -> None:
        self.table = table
        self.bounds = bounds
        self._exclusive = exclusive  # the same among replicas (StateBackend.exclusive)
        # One metadata update or delete at a time per id in this process: a delete that
        # came between an update's read and its write would be undone by the write.
        self._changing: weakref.WeakValueDictionary[str, asyncio.Lock] = \
            weakref.WeakValueDictionary()

    async def add(self, entry: StoredChat) -> bool:
        """Keep `entry`; False when it alone is over its owner's byte share (not kept).
        StateUnavailable when the shared store is out of reach."""
        return await put_within_share(self.table, self.bounds, entry.owner, entry.id, entry,
                                      entry.size)

    async def get(self, completion_id: str, owner: str) -> StoredChat | None:
        return await self.table.get(owner, completion_id)

    async def head(self, completion_id: str, owner: str) -> StoredChat | None:
        """The completion without its messages (which the shared store then does not
        read)."""
        return await self.table.head(owner, completion_id)

    async def listed(self, owner: str) -> list[StoredChat]:
        """The owner's completions as they were made (their ids sort so: a metadata
        update, which stores one anew, does not move it), without their messages (shared
        store)."""
        return sorted(await self.table.heads(owner), key=lambda entry: entry.id)

    async def delete(self, completion_id: str, owner: str) -> bool:
        async with self._lock(completion_id), self._exclusive(f"chat:{completion_id}"):
            return await self.table.delete(owner, completion_id)

    async def set_metadata(self, completion_id: str, owner: str,
                           metadata: dict[str, str]) -> StoredChat | None:
        """The completion with `metadata` in place of its own (None: there is none). Kept
        anew: its TTL starts again and it is the newest as eviction goes. StoredChatFull
        when it would no longer fit its owner's share."""
        async with self._lock(completion_id), self._exclusive(f"chat:{completion_id}"):
            current = await self.get(completion_id, owner)
            if current is None:
                return None
            changed = replace(current, metadata=metadata, size=current.size
                              - len(encoded(current.metadata)) + len(encoded(metadata)))
            if not await self.add(changed):  # the one as it was stays
                raise StoredChatFull(f"{changed.size} bytes, over the "
                                     f"{self.bounds.max_bytes_per_owner} bytes kept per key")
            return changed

    def _lock(self, completion_id: str) -> asyncio.Lock:
        lock = self._changing.get(completion_id)
        if lock is None:
            lock = self._changing[completion_id] = asyncio.Lock()
        return lock


def _encode(entry: StoredChat) -> tuple[bytes, bytes]:
    # The head is what a listing reads: its few fields, then the completion's JSON as it is
    # (a listing parses the fields only); the messages, which may hold images, are the
    # body, read only for the one completion asked for: one JSON value a line.
    fields = [entry.id, entry.owner, entry.created, entry.model, entry.metadata, entry.size]
    # No messages: their body was lost (evicted from Redis); a metadata update keeps the
    # record, its messages page stays a 404.
    body = b"\n".join(entry.messages) if entry.messages is not None else b""
    return (encoded(fields) + b"\n" + entry.completion, body)


def _decode(head: bytes, body: bytes | None) -> StoredChat:
    cut = head.find(b"\n")
    if cut < 0:  # stored by an earlier version: one JSON list (and a list of messages)
        return _decode_earlier(head, body)
    entry_id, owner, created, model, metadata, size = json.loads(head[:cut])
    messages = lines(body) if body else None
    return StoredChat(entry_id, owner, created, model, metadata, memoryview(head)[cut + 1:],
                      messages, size)


def _decode_earlier(head: bytes, body: bytes | None) -> StoredChat:
    entry_id, owner, created, metadata, completion, size = json.loads(head)
    # "null": an earlier version updated the metadata of a record whose body was lost.
    loaded = json.loads(body) if body else None
    messages = None if loaded is None else [encoded(message) for message in loaded]
    return StoredChat(entry_id, owner, created, completion["model"], metadata,
                      encoded(completion), messages, size)


# Heavy: messages with images inlined are megabytes of JSON, copied off-loop.
CHAT_CODEC: Codec[StoredChat] = Codec(_encode, _decode, heavy=True)


def open_chat_store(settings: Settings, backend: StateBackend) -> ChatStore:
    """The routes' chat completion store, where `state_url` says."""
    bounds = chat_store_bounds(settings)
    return ChatStore(backend.table("chat_completions", bounds, CHAT_CODEC), bounds,
                     backend.exclusive)
