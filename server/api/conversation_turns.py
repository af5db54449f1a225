"""A response on a conversation (`conversation` on POST /responses): the conversation held
for the response's run, its items read as the earlier turns, the response's input and
output appended when it has answered."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from server.api.conversation_access import conversation_id as conversation_key
from server.api.conversation_access import owned_conversation, refuse_duplicates
from server.api.conversation_locks import Lease
from server.api.conversation_store import ConversationFull, StoredConversation
from server.api.errors import APIError
from server.api.responses_protocol import ConversationRef
from server.api.state import AppState
from server.api.stored_items import StoredItem, items_size, stored_items
from server.store import StateUnavailable

logger = logging.getLogger("vlserve.api")


class ConversationTurn:
    def __init__(self, state: AppState, conversation: StoredConversation,
                 lease: Lease) -> None:
        self.state = state
        self.conversation = conversation
        self.lease = lease

    @classmethod
    async def start(cls, state: AppState, ref: str | ConversationRef, owner: str, *,
                    lapses: bool) -> ConversationTurn:
        """The conversation, held until `release` (404 when the owner has no such
        conversation, then 400 conversation_locked while another response runs on it).
        `lapses`: the hold may be given back late (server.api.conversation_locks)."""
        conversation_id = conversation_key(ref)
        # Whose it is first: another key learns nothing from a lock on it.
        await owned_conversation(state, conversation_id, owner, "conversation")
        lease = await state.conversation_locks.acquire(conversation_id, lapses=lapses)
        try:  # read again once held: the turn before this one has been appended by now
            conversation = await owned_conversation(state, conversation_id, owner,
                                                    "conversation")
        except BaseException:
            lease.release()
            raise
        return cls(state, conversation, lease)

    @property
    def id(self) -> str:
        return self.conversation.id

    async def check_input(self, input_items: list[StoredItem]) -> None:
        """Refuse a turn whose input repeats an item id the conversation holds (OpenAI's
        duplicate-item 400: a call sent back that the conversation recorded), or whose
        input alone takes the conversation over its owner's byte share (it could not be
        kept)."""
        refuse_duplicates(self.conversation.items, [item.id for item in input_items],
                          "input")
        size = items_size(input_items)
        share = self.state.conversations.bounds.max_bytes_per_owner
        if self.conversation.size + size > share:
            raise APIError(400, f"conversation: this input would take it to "
                           f"{self.conversation.size + size} bytes, over the {share} bytes "
                           "kept per key; start a new conversation or delete items",
                           param="conversation", code="conversation_too_large")

    async def record(self, input_items: list[StoredItem],
                     output: list[dict[str, Any]]) -> None:
        """Append the turn's items (its input, then its output), then give the conversation
        back: the next turn may start before this response's end is stored or sent. The
        answer is out (or on its way) by now: a failure is the operator's to read in the
        log."""
        try:
            items = input_items + await asyncio.to_thread(stored_items, output)
            kept = await self.state.conversations.append(self.id, self.conversation.owner,
                                                         items)
        except ConversationFull as exc:
            logger.warning("conversation %s: turn not kept: %s", self.id, exc)
        except StateUnavailable as exc:
            logger.error("conversation %s: turn not kept: %s", self.id, exc)
        else:
            if kept is None:
                logger.info("conversation %s was deleted while a response ran on it", self.id)
        await self.aclose()

    def release(self) -> None:
        """Give the conversation back without waiting (a cancelled task's `finally`)."""
        self.lease.release()

    async def aclose(self) -> None:
        """Give it back and wait until it is free (on a shared store, a round trip):
        before the answer's end goes out, so the client's next turn finds it free."""
        await self.lease.aclose()
