"""Pure logic of conversations: the store's bounds (a conversation over its key's share is
refused, a key over its share loses its least recently used conversation, the TTL counts
from the last write) and the per-conversation lock (a lease never given back lapses)."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from server.api.conversation_locks import ConversationLocks
from server.api.conversation_store import (
    ConversationFull,
    Conversations,
    StoredConversation,
    new_conversation,
    with_metadata,
    without_item,
)
from server.api.errors import APIError
from server.api.stored_items import StoredItem, stored_items
from server.store import Bounds
from server.store.memory import MemoryTable
from server.store.table import AsyncMemoryTable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def store(max_count: int = 10, max_bytes: int = 1 << 20, per_owner_count: int = 10,
          per_owner_bytes: int = 1 << 20, clock: Clock | None = None) -> Conversations:
    bounds = Bounds(max_count, max_bytes, 60, per_owner_count, per_owner_bytes, lru=True,
                    evict_others=True)
    return Conversations(AsyncMemoryTable(MemoryTable(bounds, clock or Clock())), bounds,
                         lambda name: contextlib.nullcontext())


def message(text: str, item_id: str = "msg_1") -> StoredItem:
    """A user message as stored (its JSON)."""
    return stored_items([{"id": item_id, "type": "message", "role": "user",
                          "status": "completed",
                          "content": [{"type": "input_text", "text": text}]}])[0]


def test_sizes_follow_appends_removals_and_metadata() -> None:
    async def go() -> None:
        conversations = store()
        made = new_conversation("a", {"k": "v"}, [message("one")])
        await conversations.put(made)
        added = [message("two", "msg_2")]
        grown = await conversations.append(made.id, "a", added)
        assert grown is not None and [i.id for i in grown.items] == ["msg_1", "msg_2"]
        again = new_conversation("a", {"k": "v"}, grown.items)
        assert grown.size == again.size  # sized by parts as if made whole
        smaller = without_item(grown, "msg_1")
        assert smaller.size == new_conversation("a", {"k": "v"}, [message("two", "msg_2")]).size
        with pytest.raises(KeyError):
            without_item(grown, "msg_9")
        renamed = with_metadata(grown, {"key": "longer value"})
        assert renamed.size == new_conversation("a", {"key": "longer value"}, grown.items).size
        assert await conversations.append("conv_gone", "a", added) is None
        assert await conversations.get(made.id, "b") is None  # another key's: unseen

    asyncio.run(go())


def test_a_conversation_over_its_keys_share_is_refused_and_kept_as_it_was() -> None:
    async def go() -> None:
        conversations = store(per_owner_bytes=2000)
        made = new_conversation("a", {}, [message("x" * 500)])
        await conversations.put(made)
        with pytest.raises(ConversationFull):
            await conversations.append(made.id, "a", [message("y" * 2000, "msg_2")])
        kept = await conversations.get(made.id, "a")
        assert kept is not None and len(kept.items) == 1

    asyncio.run(go())


def test_a_key_over_its_share_loses_its_least_recently_used_conversation() -> None:
    async def go() -> None:
        clock = Clock()
        conversations = store(per_owner_count=2, clock=clock)
        old, used = new_conversation("a", {}, []), new_conversation("a", {}, [])
        theirs = new_conversation("b", {}, [])
        for each in (old, used, theirs):
            await conversations.put(each)
        clock.now += 1
        await conversations.get(old.id, "a")  # read: now the most recently used
        await conversations.put(new_conversation("a", {}, []))
        assert await conversations.get(used.id, "a") is None
        assert await conversations.get(old.id, "a") is not None
        assert await conversations.get(theirs.id, "b") is not None
        # The TTL counts from the last write: an idle conversation goes, a written one stays.
        clock.now += 50
        await conversations.append(old.id, "a", [])
        clock.now += 20
        assert await conversations.get(old.id, "a") is not None
        assert await conversations.get(theirs.id, "b") is None

    asyncio.run(go())


def test_an_id_sent_again_gets_a_new_one_and_changes_do_not_lose_each_other() -> None:
    async def go() -> None:
        conversations = store()
        call = {"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "f",
                "arguments": "{}", "status": "completed"}
        made = new_conversation("a", {}, stored_items([call, call]))
        ids = [item.id for item in made.items]
        assert ids[0] == "fc_1" and ids[1].startswith("fc_") and len(set(ids)) == 2
        await conversations.put(made)
        # Changes run in a worker thread: without one change at a time per conversation,
        # these would read the same record and keep only one of them.
        await asyncio.gather(*(conversations.append(made.id, "a", [message(str(i), f"msg_{i}")])
                               for i in range(20)))
        kept = await conversations.get(made.id, "a")
        assert kept is not None and len(kept.items) == 22
        assert kept.size == new_conversation("a", {}, kept.items).size

    asyncio.run(go())


def test_a_delete_waits_for_a_change_under_way() -> None:
    async def go() -> None:
        conversations = store()
        made = new_conversation("a", {}, [message("one")])
        await conversations.put(made)
        gate = threading.Event()

        def slow(current: StoredConversation) -> StoredConversation:
            gate.wait(5)
            return with_metadata(current, {"k": "v"})

        change = asyncio.create_task(conversations.change(made.id, "a", slow))
        await asyncio.sleep(0.05)
        deleting = asyncio.create_task(conversations.delete(made.id, "a"))
        await asyncio.sleep(0.05)
        gate.set()
        await change
        assert await deleting and await conversations.get(made.id, "a") is None

    asyncio.run(go())


def test_one_lease_per_conversation_and_a_forgotten_one_lapses() -> None:
    async def go() -> None:
        clock = Clock()
        locks = ConversationLocks(lapse_s=100, clock=clock)
        lease = await locks.acquire("conv_a")
        with pytest.raises(APIError) as locked:
            await locks.acquire("conv_a")
        assert locked.value.code == "conversation_locked" and locked.value.status == 400
        (await locks.acquire("conv_b")).release()
        lease.release()
        lease.release()  # idempotent: the stream's end and the background task both call it
        assert len(locks) == 0
        forgotten = await locks.acquire("conv_a", lapses=True)  # a stream's, not started
        clock.now += 101
        successor = await locks.acquire("conv_a")
        forgotten.release()  # late: must not free the successor's hold
        clock.now += 1000  # a hold that is always given back (a run, a started stream) stays
        with pytest.raises(APIError):
            await locks.acquire("conv_a")
        successor.release()
        queued = await locks.acquire("conv_a", lapses=True)
        clock.now += 90
        queued.touch()  # handed over after 90 s in the queue: the lapse counts from here
        clock.now += 20
        with pytest.raises(APIError):
            await locks.acquire("conv_a")
        queued.release()
        started = await locks.acquire("conv_a", lapses=True)
        started.pin()
        clock.now += 1000
        with pytest.raises(APIError):
            await locks.acquire("conv_a")
        started.release()
        assert len(locks) == 0

    asyncio.run(go())
