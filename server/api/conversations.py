"""The Conversations API: POST/GET/DELETE /conversations and their items. A conversation
is an owner's list of input items; /responses with `conversation` reads it as the earlier
turns and appends its input and output to it (server.api.responses)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from server.api.auth import client_identity
from server.api.conversation_access import checked_items, not_found, owned_conversation
from server.api.conversation_store import (
    ConversationFull,
    StoredConversation,
    appended,
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
from server.api.json_pages import JSONPartsResponse
from server.api.offloop_json import OffLoopJSONRoute
from server.api.openapi import responses
from server.api.responses_protocol import Includable
from server.api.state import AppState
from server.api.stored_items import item_page_parts, stored_items

router = APIRouter(route_class=OffLoopJSONRoute)


@router.post("/conversations", responses=responses(ConversationObject, 400, 413, 503))
async def create_conversation(body: ConversationCreate, request: Request) -> JSONResponse:
    state: AppState = request.app.state.vlserve
    items = checked_items(body.items or [], "items")
    # Off the event loop: items are kept encoded, images and all.
    conversation = await asyncio.to_thread(
        lambda: new_conversation(client_identity(request.scope), body.metadata or {},
                                 stored_items(items)))
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
    metadata = body.metadata or {}  # null clears it, as OpenAI's
    updated = await _change(state, request, conversation_id,
                            lambda current: with_metadata(current, metadata))
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
                     include: Annotated[list[Includable] | None, Query(max_length=16)] = None
                     ) -> JSONPartsResponse:
    """Cursor-paginated like OpenAI's (`after`, `limit`, `has_more`). `include` (OpenAI's
    values; another is a 400) adds nothing: items are kept as they were added (no logprobs,
    no encrypted reasoning)."""
    conversation = await _owned(request, conversation_id)
    return JSONPartsResponse(item_page_parts(conversation.items, order=order, after=after,
                                             limit=limit, holder="conversation"))


@router.post("/conversations/{conversation_id}/items",
             responses=responses(ConversationItemList, 400, 404, 413, 503))
async def add_items(conversation_id: str, body: ItemsCreate,
                    request: Request) -> JSONPartsResponse:
    """Append items (as a response's input would be); answers the items added, with ids."""
    state: AppState = request.app.state.vlserve
    added = checked_items(body.items, "items", (await _owned(request, conversation_id)).items)
    kept = await _change(state, request, conversation_id,
                         lambda current: appended(current, stored_items(added)))
    listed = kept.items[-len(added):]  # with the ids they were kept under
    return JSONPartsResponse(item_page_parts(listed, order="asc", after=None,
                                             limit=len(listed), holder="conversation"))


@router.get("/conversations/{conversation_id}/items/{item_id}", responses=responses(None, 404))
async def get_item(conversation_id: str, item_id: str,
                   request: Request) -> JSONPartsResponse:
    conversation = await _owned(request, conversation_id)
    for item in conversation.items:
        if item.id == item_id:
            return JSONPartsResponse([item.json])
    raise _item_not_found(item_id)


@router.delete("/conversations/{conversation_id}/items/{item_id}",
               responses=responses(ConversationObject, 404, 503))
async def delete_item(conversation_id: str, item_id: str, request: Request) -> JSONResponse:
    """Remove one item; answers the conversation, as OpenAI's."""
    state: AppState = request.app.state.vlserve
    try:
        smaller = await _change(state, request, conversation_id,
                                lambda current: without_item(current, item_id))
    except KeyError:
        raise _item_not_found(item_id) from None
    return JSONResponse(smaller.view())


async def _owned(request: Request, conversation_id: str) -> StoredConversation:
    state: AppState = request.app.state.vlserve
    return await owned_conversation(state, conversation_id, client_identity(request.scope),
                                    "conversation_id")


async def _keep(state: AppState, conversation: StoredConversation) -> None:
    try:
        await state.conversations.put(conversation)
    except ConversationFull as exc:
        raise _full(exc) from exc


async def _change(state: AppState, request: Request, conversation_id: str,
                  how: Callable[[StoredConversation], StoredConversation]
                  ) -> StoredConversation:
    try:
        changed = await state.conversations.change(
            conversation_id, client_identity(request.scope), how)
    except ConversationFull as exc:
        raise _full(exc) from exc
    if changed is None:
        raise not_found(conversation_id, "conversation_id")
    return changed


def _full(exc: ConversationFull) -> APIError:
    return APIError(400, f"conversation: too large to keep ({exc}); start a new "
                    "conversation or delete items", param="conversation",
                    code="conversation_too_large")


def _item_not_found(item_id: str) -> APIError:
    return APIError(404, f"item_id: no item with id {item_id!r} in this conversation",
                    param="item_id", code="item_not_found")

