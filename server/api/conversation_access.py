"""Finding a client's conversation and checking items for one: shared by the Conversations
routes, responses on a conversation and their token counts."""

from __future__ import annotations

from typing import Any

from server.api.conversation_store import StoredConversation, duplicate_item
from server.api.errors import APIError
from server.api.responses_input import item_dicts, to_chat_messages
from server.api.responses_protocol import ConversationRef, InputItem
from server.api.state import AppState
from server.api.stored_items import StoredItem


def conversation_id(ref: str | ConversationRef) -> str:
    """`conversation` on /responses: an id, or an object holding it."""
    return ref if isinstance(ref, str) else ref.id


async def owned_conversation(state: AppState, conversation_id: str, owner: str,
                             param: str) -> StoredConversation:
    """The owner's conversation; a 404 naming `param` when it has none of that id (another
    key's is as unknown as one that never was)."""
    conversation = await state.conversations.get(conversation_id, owner)
    if conversation is None:
        raise not_found(conversation_id, param)
    return conversation


def not_found(conversation_id: str, param: str) -> APIError:
    return APIError(404, f"{param}: no conversation with id {conversation_id!r} (unknown, "
                    "deleted or expired)", param=param, code="conversation_not_found")


def checked_items(items: list[InputItem], param: str,
                  held: list[StoredItem] | None = None) -> list[dict[str, Any]]:
    """Items as stored (each with an id), checked as a response would read them (an image
    needs exactly one of image_url and file_id, ...): a bad item is refused here, not on
    every later turn. An id the conversation (`held`) or the items hold already is a 400,
    as OpenAI's."""
    to_chat_messages(items, [f"{param}.{i}" for i in range(len(items))])
    stored = item_dicts(items)
    refuse_duplicates(held or [], [item["id"] for item in stored], param)
    return stored


def refuse_duplicates(held: list[StoredItem], ids: list[str], param: str) -> None:
    """A 400 naming the first of `ids` (as `param`.N) that `held` or an earlier one of them
    has already, as OpenAI's."""
    repeated = duplicate_item(held, ids)
    if repeated is not None:
        index, item_id = repeated
        raise APIError(400, f"{param}.{index}: duplicate item found with id {item_id!r} (an "
                       "item already in the conversation, or sent twice); leave it out",
                       param=f"{param}.{index}", code="duplicate_item")
