"""Stored chat completions (`store: true` on POST /chat/completions): listed, read, their
metadata replaced, deleted, their request's messages listed, as OpenAI's API and the
SDK's `client.chat.completions.list/retrieve/update/delete` and `.messages.list` have it.
A key sees only its own; another key's completion is as unknown as one never stored."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from server.api.auth import client_identity
from server.api.chat_store import StoredChat, StoredChatFull
from server.api.errors import APIError
from server.api.item_pages import page_span
from server.api.json_pages import JSONPartsResponse, list_parts
from server.api.offloop_json import OffLoopJSONRoute
from server.api.openapi import responses
from server.api.state import AppState
from server.api.stored_chat_protocol import (
    ChatCompletionDeleted,
    ChatCompletionUpdate,
    StoredChatCompletion,
    StoredChatCompletionList,
    StoredMessageList,
)

router = APIRouter(route_class=OffLoopJSONRoute)

# `metadata[key]=value` filters, as the SDK sends the `metadata` of list(): at most
# OpenAI's 16 pairs.
_METADATA_FILTERS = 16


# Declared for the document: FastAPI has no way to read a deepObject query parameter.
_METADATA_PARAM = {"name": "metadata", "in": "query", "required": False,
                   "style": "deepObject", "explode": True,
                   "description": "`metadata[key]=value`: only completions whose metadata "
                   "holds each pair",
                   "schema": {"type": "object",
                              "propertyNames": {"pattern": r"^[^\[\]]+$"},
                              "additionalProperties": {"type": "string"},
                              "maxProperties": _METADATA_FILTERS}}


@router.get("/chat/completions", responses=responses(StoredChatCompletionList, 400),
            openapi_extra={"parameters": [_METADATA_PARAM]})
async def list_chat_completions(request: Request, after: str | None = None,
                                limit: int = Query(20, ge=1, le=100),
                                order: Literal["asc", "desc"] = "asc",
                                model: str | None = None) -> JSONPartsResponse:
    """The key's stored completions by creation (`order`, default `asc` as OpenAI's),
    cursor-paginated (`after`, `limit`, `has_more`); `model` and `metadata[key]=value`
    (each pair must match) filter them. Ids sort by creation (observe.new_completion_id),
    so `after` goes on from its place even when the completion it names has gone since
    (evicted, expired, deleted, or no longer matching the filter)."""
    state: AppState = request.app.state.vlserve
    wanted = _metadata_filters(request)
    listed = [entry for entry in await state.chat_store.listed(
        client_identity(request.scope))
        if (model is None or entry.model == model)
        and all(entry.metadata.get(key) == value for key, value in wanted.items())]
    if order == "desc":
        listed.reverse()
    if after is not None:
        listed = [entry for entry in listed
                  if (entry.id > after if order == "asc" else entry.id < after)]
    return JSONPartsResponse(list_parts([(entry.id, entry.view()) for entry in listed[:limit]],
                                        has_more=len(listed) > limit))


@router.get("/chat/completions/{completion_id}",
            responses=responses(StoredChatCompletion, 404))
async def get_chat_completion(completion_id: str, request: Request) -> JSONPartsResponse:
    return JSONPartsResponse((await _owned(request, completion_id, messages=False)).view())


@router.post("/chat/completions/{completion_id}",
             responses=responses(StoredChatCompletion, 400, 404, 413, 503))
async def update_chat_completion(completion_id: str, body: ChatCompletionUpdate,
                                 request: Request) -> JSONPartsResponse:
    """Replace the stored completion's metadata (the only thing that can change)."""
    state: AppState = request.app.state.vlserve
    try:
        updated = await state.chat_store.set_metadata(
            completion_id, client_identity(request.scope), body.metadata or {})
    except StoredChatFull as exc:
        raise APIError(400, f"metadata: the completion would be too large to keep ({exc})",
                       param="metadata") from exc
    if updated is None:
        raise not_found(completion_id)
    return JSONPartsResponse(updated.view())


@router.delete("/chat/completions/{completion_id}",
               responses=responses(ChatCompletionDeleted, 404))
async def delete_chat_completion(completion_id: str, request: Request) -> JSONResponse:
    state: AppState = request.app.state.vlserve
    if not await state.chat_store.delete(completion_id, client_identity(request.scope)):
        raise not_found(completion_id)
    return JSONResponse({"id": completion_id, "object": "chat.completion.deleted",
                         "deleted": True})


@router.get("/chat/completions/{completion_id}/messages",
            responses=responses(StoredMessageList, 400, 404))
async def list_chat_messages(completion_id: str, request: Request, after: str | None = None,
                             limit: int = Query(20, ge=1, le=100),
                             order: Literal["asc", "desc"] = "asc") -> JSONPartsResponse:
    """The request's messages (ids `<completion id>-<index>`), cursor-paginated like
    OpenAI's (`after`, `limit`, `has_more`; `order` default `asc`)."""
    stored = await _owned(request, completion_id)
    if stored.messages is None:  # its body lost in the shared store: nothing to page
        raise not_found(completion_id)
    ids = [f"{completion_id}-{index}" for index in range(len(stored.messages))]
    span, has_more = page_span(ids, order=order, after=after, limit=limit,
                               holder="chat completion")
    return JSONPartsResponse(list_parts([(ids[i], [stored.messages[i]]) for i in span],
                                        has_more=has_more))


async def _owned(request: Request, completion_id: str, *,
                 messages: bool = True) -> StoredChat:
    """The caller's completion; without its messages unless `messages`."""
    state: AppState = request.app.state.vlserve
    store = state.chat_store
    owner = client_identity(request.scope)
    stored = await (store.get if messages else store.head)(completion_id, owner)
    if stored is None:
        raise not_found(completion_id)
    return stored


def not_found(completion_id: str) -> APIError:
    return APIError(404, f"completion_id: no stored chat completion with id "
                    f"{completion_id!r} (unknown, deleted or expired; only those made with "
                    "`store: true` are kept)", param="completion_id",
                    code="chat_completion_not_found")


def _metadata_filters(request: Request) -> dict[str, str]:
    """The `metadata[key]=value` query parameters as {key: value}, a key once. Brackets in
    a key are refused: `metadata[a][b]` (an object, not a string) would read as the key
    `a][b`. A key or value longer than metadata's can be matches nothing (the request line
    is bounded by max_header_bytes)."""
    wanted: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name == "metadata" or name.startswith("metadata["):
            key = name[len("metadata["):-1]
            if not (name.endswith("]") and key and "[" not in key and "]" not in key
                    and key not in wanted):
                raise APIError(400, f"metadata: {name!r} is no filter; send "
                               "metadata[key]=value, once per key (no brackets in it)",
                               param="metadata")
            wanted[key] = value
    if len(wanted) > _METADATA_FILTERS:
        raise APIError(400, f"metadata: at most {_METADATA_FILTERS} filters, not "
                       f"{len(wanted)}", param="metadata")
    return wanted
