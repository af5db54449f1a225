"""The Conversations API: POST/GET/DELETE /conversations and their items. A conversation
is an owner's list of input items; /responses with `conversation` reads it as the earlier
turns and appends its input and output to it (server.api.responses)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from server.api.auth import client_identity
from server.api.conversation_store import (
    ConversationFull,
    StoredConversation,
    items_size,
    new_conversation,
    with_metadata,
    without_item,
)
from server.api.conversations_protocol import (
    ConversationCreate,
    ConversationDeleted,
    ConversationItemList,
    ConversationObject,
    ConversationUpdate,
    ItemsCreate,
)
from server.api.errors import APIError
from server.api.item_pages import item_page
from server.api.offloop_json import OffLoopJSONRoute
from server.api.openapi import responses
from server.api.responses_input import item_dicts, to_chat_messages
from server.api.responses_protocol import InputItem
from server.api.state import AppState

router = APIRouter(route_class=OffLoopJSONRoute)


@router.post("/conversations", responses=responses(ConversationObject, 400, 413, 503))
async def create_conversation(body: ConversationCreate, request: Request) -> JSONResponse:
    state: AppState = request.app.state.vlserve
    items = checked_items(body.items or [], "items")
    # Off the event loop: sizing items means serialising their images.
    conversation = await asyncio.to_thread(new_conversation, client_identity(request.scope),
                                           body.metadata or {}, items)
    await _keep(state, conversation)
    return JSONResponse(conversation.view())


@router.get("/conversations/{conversation_id}", responses=responses(ConversationObject, 404))
async def get_conversation(conversation_id: str, request: Request) -> JSONResponse:
    return JSONResponse((await _owned(request, conversation_id)).view())


@router.post("/conversations/{conversation_id}",
             responses=responses(ConversationObject, 400, 404, 503))
async def update_conversation(conversation_id: str, body: ConversationUpdate,
                              request: Request) -> JSONResponse:
    """Replace the conversation's metadata (its items stay)."""
    state: AppState = request.app.state.vlserve
    updated = with_metadata(await _owned(request, conversation_id), body.metadata)
    await _keep(state, updated)
    return JSONResponse(updated.view())


@router.delete("/conversations/{conversation_id}",
               responses=responses(ConversationDeleted, 404))
async def delete_conversation(conversation_id: str, request: Request) -> JSONResponse:
    state: AppState = request.app.state.vlserve
    if not await state.conversations.delete(conversation_id, client_identity(request.scope)):
        raise not_found(conversation_id, "conversation_id")
    return JSONResponse({"id": conversation_id, "object": "conversation.deleted",
                         "deleted": True})


@router.get("/conversations/{conversation_id}/items",
            responses=responses(ConversationItemList, 400, 404))
async def list_items(conversation_id: str, request: Request, after: str | None = None,
                     limit: int = Query(20, ge=1, le=100),
                     order: Literal["asc", "desc"] = "desc",
                     include: Annotated[list[str] | None, Query(max_length=16)] = None
                     ) -> JSONResponse:
    """Cursor-paginated like OpenAI's (`after`, `limit`, `has_more`). `include` is accepted
    and adds nothing: items are kept as they were added (no logprobs, no encrypted
    reasoning)."""
    conversation = await _owned(request, conversation_id)
    return JSONResponse(item_page(conversation.items, order=order, after=after, limit=limit,
                                  holder="conversation"))


@router.post("/conversations/{conversation_id}/items",
             responses=responses(ConversationItemList, 400, 404, 413, 503))
async def add_items(conversation_id: str, body: ItemsCreate, request: Request) -> JSONResponse:
    """Append items (as a response's input would be); answers the items added, with ids."""
    state: AppState = request.app.state.vlserve
    owner = client_identity(request.scope)
    added = checked_items(body.items, "items")
    await _owned(request, conversation_id)  # a 404 before any sizing work
    size = await asyncio.to_thread(items_size, added)  # images are serialised to size them
    try:
        kept = await state.conversations.append(conversation_id, owner, added, size)
    except ConversationFull as exc:
        raise _full(exc) from exc
    if kept is None:  # deleted meanwhile
        raise not_found(conversation_id, "conversation_id")
    return JSONResponse(item_page(added, order="asc", after=None, limit=len(added),
                                  holder="conversation"))


@router.get("/conversations/{conversation_id}/items/{item_id}", responses=responses(None, 404))
async def get_item(conversation_id: str, item_id: str, request: Request) -> JSONResponse:
    conversation = await _owned(request, conversation_id)
    for item in conversation.items:
        if item["id"] == item_id:
            return JSONResponse(item)
    raise _item_not_found(item_id)


@router.delete("/conversations/{conversation_id}/items/{item_id}",
               responses=responses(ConversationObject, 404, 503))
async def delete_item(conversation_id: str, item_id: str, request: Request) -> JSONResponse:
    """Remove one item; answers the conversation, as OpenAI's."""
    state: AppState = request.app.state.vlserve
    conversation = await _owned(request, conversation_id)
    smaller = without_item(conversation, item_id)
    if smaller is None:
        raise _item_not_found(item_id)
    await _keep(state, smaller)
    return JSONResponse(smaller.view())


def checked_items(items: list[InputItem], param: str) -> list[dict[str, Any]]:
    """Items as stored (each with an id), checked as a response would read them (an image
    needs exactly one of image_url and file_id, ...): a bad item is refused here, not on
    every later turn."""
    to_chat_messages(items, [f"{param}.{i}" for i in range(len(items))])
    return item_dicts(items)


async def owned_conversation(state: AppState, conversation_id: str, owner: str,
                             param: str) -> StoredConversation:
    conversation = await state.conversations.get(conversation_id, owner)
    if conversation is None:
        raise not_found(conversation_id, param)
    return conversation


async def _owned(request: Request, conversation_id: str) -> StoredConversation:
    state: AppState = request.app.state.vlserve
    return await owned_conversation(state, conversation_id, client_identity(request.scope),
                                    "conversation_id")


async def _keep(state: AppState, conversation: StoredConversation) -> None:
    try:
        await state.conversations.put(conversation)
    except ConversationFull as exc:
        raise _full(exc) from exc


def _full(exc: ConversationFull) -> APIError:
    return APIError(400, f"conversation: too large to keep ({exc}); start a new "
                    "conversation or delete items", param="conversation",
                    code="conversation_too_large")


def not_found(conversation_id: str, param: str) -> APIError:
    return APIError(404, f"{param}: no conversation with id {conversation_id!r} (unknown, "
                    "deleted or expired)", param=param, code="conversation_not_found")


def _item_not_found(item_id: str) -> APIError:
    return APIError(404, f"item_id: no item with id {item_id!r} in this conversation",
                    param="item_id", code="item_not_found")

