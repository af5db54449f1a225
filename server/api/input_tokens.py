"""POST /responses/input_tokens (`client.responses.input_tokens.count`): how many tokens the
same POST /responses would read, counted as the engine reads them (template, instructions,
tool prompt, images, the earlier turns of `previous_response_id` or `conversation`, and the
turns `truncation: "auto"` would drop left out), so it equals the response's
`usage.input_tokens`. Nothing is generated; the engine's slots are untouched."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from server.api.auth import client_identity
from server.api.conversation_access import conversation_id, owned_conversation
from server.api.errors import APIError
from server.api.generation import max_tokens, require_ready
from server.api.messages import to_engine_messages
from server.api.offloop_json import OffLoopJSONRoute
from server.api.openapi import responses
from server.api.responses_input import request_items
from server.api.responses_prompt import (
    build_prompt,
    check_continuation,
    fit_prompt,
    plan_output,
    previous_response,
)
from server.api.responses_protocol import ResponsesRequest
from server.api.state import AppState
from server.api.stored_items import StoredItem, item_values
from server.engine import ErrorEvent, GenerationRequest
from server.timings import StageTimer

router = APIRouter(route_class=OffLoopJSONRoute)


class InputTokenCount(BaseModel):
    object: Literal["response.input_tokens"]
    input_tokens: int


@router.post("/responses/input_tokens",
             responses=responses(InputTokenCount, 400, 404, 413, 503))
async def count_input_tokens(body: ResponsesRequest, request: Request) -> JSONResponse:
    """The body is POST /responses's (its generation settings are read only where they
    change the prompt: `max_output_tokens` for what truncation keeps)."""
    state: AppState = request.app.state.vlserve
    require_ready(state)
    client = client_identity(request.scope)
    check_continuation(body)
    stored: list[StoredItem] = []
    origin = "conversation"
    previous = await previous_response(state, body, client)
    if previous is not None:
        stored, origin = previous.conversation or [], "previous_response_id"
    elif body.conversation is not None:
        stored = (await owned_conversation(state, conversation_id(body.conversation), client,
                                           "conversation")).items
    output = await plan_output(body)
    earlier = await asyncio.to_thread(item_values, stored) if stored else []  # JSON kept
    prompt = build_prompt(body, earlier, origin, request_items(body), output.tools,
                          state.engine.template)
    counting = GenerationRequest(messages=[], max_tokens=max_tokens(
        body.max_output_tokens, state.settings), timer=StageTimer(), client=client,
        template_kwargs=prompt.template_kwargs)
    if body.truncation == "auto":
        counting.messages = (await fit_prompt(state, prompt, counting, client)).messages
    else:
        counting.messages = await to_engine_messages(prompt.messages, state, counting.timer,
                                                     client, prompt.where)
    counted = await state.engine.tokenize(counting)
    if isinstance(counted, ErrorEvent):
        raise APIError(counted.status, counted.message, code=counted.code)
    return JSONResponse({"object": "response.input_tokens", "input_tokens": counted.count})
