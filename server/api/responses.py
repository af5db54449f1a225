"""POST /responses, and the stored ones (GET, DELETE, input_items): the Responses API as a
translation onto the chat path: the same GenerationRequest, the same engine events, the same
message conversion, image decoding, tool and response_format planning."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.convertors import StringConvertor, register_url_convertor

from server.api.auth import client_identity
from server.api.background import BackgroundRun
from server.api.conversation_turns import ConversationTurn
from server.api.errors import APIError, error_response
from server.api.generation import (
    Event,
    Events,
    cancel_on_disconnect,
    max_tokens,
    require_ready,
    sampling_params,
    sse_response,
    start_generation,
    whole_answer,
)
from server.api.json_pages import JSONPartsResponse
from server.api.messages import to_engine_messages
from server.api.observe import RequestRecord, request_record
from server.api.offloop_json import OffLoopJSONRoute
from server.api.openapi import event_stream, responses
from server.api.reasoning import plan_reasoning
from server.api.response_store import StoredResponse, stored_response, with_output
from server.api.responses_background import (
    deleted_elsewhere,
    later_stream,
    run_in_background,
    stopped,
    superseded,
    too_large,
)
from server.api.responses_input import (
    item_dicts,
    request_items,
)
from server.api.responses_output import (
    Finished,
    ResponseDraft,
    answer_items,
    status_of,
    stream_events,
)
from server.api.responses_prompt import (
    OutputPlan,
    build_prompt,
    check_continuation,
    fit_prompt,
    owned_response,
    plan_output,
    previous_response,
    response_not_found,
)
from server.api.responses_protocol import (
    InputItemList,
    ResponseDeleted,
    ResponseObject,
    ResponsesRequest,
    StreamEvent,
)
from server.api.state import AppState
from server.api.stored_items import item_page_parts, item_values, stored_items
from server.api.tool_calls import (
    ToolPlan,
    answer_message,
)
from server.api.unserved import refuse_unserved, tier_echo
from server.engine import ErrorEvent, GenerationRequest
from server.store import StateUnavailable
from server.timings import StageTimer


class _ResponseId(StringConvertor):
    """A response id in a path: any segment but `input_tokens`, POST /responses/input_tokens
    (so that path answers only POST, and its 405 says so)."""

    regex = "(?!input_tokens$)[^/]+"


register_url_convertor("response_id", _ResponseId())
router = APIRouter(route_class=OffLoopJSONRoute)
logger = logging.getLogger("vlserve.api")

_OK = "The response as JSON or, with `stream: true`, as server-sent events (`event:` its " \
    "type, `data:` the event as JSON, numbered by `sequence_number`), ending with " \
    "response.completed, response.incomplete or response.failed"


@router.post("/responses", response_model=None,
             responses=responses(ResponseObject, 400, 404, 413, 429, 500, 503, 504,
                                 ok_description=_OK, content=event_stream(StreamEvent)))
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    state: AppState = request.app.state.vlserve
    require_ready(state)
    record = _response_record(request)
    record.timer = StageTimer()
    record.stream = body.stream
    client = client_identity(request.scope)
    check_continuation(body)
    refuse_unserved(verbosity=body.text.verbosity if body.text else None,
                    verbosity_param="text.verbosity")
    if body.background and not body.store:
        raise APIError(400, "background: a background response is read back from the "
                       "store: store must be true", param="background")
    if body.background:
        state.background.check_room(client)  # before any work for nothing
    previous = await previous_response(state, body, client)
    output = await plan_output(body)
    turn = None
    if body.conversation is not None:
        # A stream's hold may never be given back if its stream never starts: it lapses.
        turn = await ConversationTurn.start(state, body.conversation, client,
                                            lapses=body.stream and not body.background)
    try:
        answer = await _respond(state, request, body, record, client, previous, turn, output)
    except BaseException:
        if turn is not None:
            turn.release()
        raise
    if turn is not None and not isinstance(answer, StreamingResponse) and not body.background:
        # A stream releases it at its end, a background run when it ends. Waited for: a
        # client retrying a refused turn at once must find it free (shared store: the drop
        # is a round trip).
        await turn.aclose()
    return answer


async def _respond(state: AppState, request: Request, body: ResponsesRequest,
                   record: RequestRecord, client: str, previous: StoredResponse | None,
                   turn: ConversationTurn | None, output: OutputPlan) -> Response:
    timer = record.timer
    assert timer is not None
    stored = (previous.conversation or []) if previous else \
        turn.conversation.items if turn else []
    items = request_items(body)
    # Stored items are kept as JSON: decoded in a worker thread, one at a time.
    earlier = await asyncio.to_thread(item_values, stored) if stored else []
    prompt = build_prompt(body, earlier, "previous_response_id" if previous else "conversation",
                          items, output.tools, state.engine.template)
    plan, constraint, kwargs = output.tools, output.constraint, prompt.template_kwargs
    reasoning = plan_reasoning(state, kwargs, constrained=constraint is not None)
    generation = GenerationRequest(
        messages=[], max_tokens=max_tokens(body.max_output_tokens, state.settings),
        sampling=sampling_params(temperature=body.temperature, top_p=body.top_p,
                                 grammar=constraint[1] if constraint else None),
        timer=timer, request_id=record.request_id, client=client,
        # Token by token: reasoning is counted so; a background run's state, followers and
        # cancel need its output as it comes.
        stream=body.stream or body.background or reasoning is not None,
        tenant=state.cache_tenant(client), template_kwargs=kwargs,
        top_logprobs=_top_logprobs(body))
    # A background response outlives its request: a client that leaves does not stop it.
    watcher = None if body.background else asyncio.create_task(
        cancel_on_disconnect(request, generation))
    try:
        # Encoded once, off the loop (images): stored, appended and sized as these bytes.
        input_items = await asyncio.to_thread(lambda: stored_items(item_dicts(items)))
        if turn is not None:
            await turn.check_input(input_items)
        conversation = stored + input_items
        converted = None
        if body.truncation == "auto":
            fitted = await fit_prompt(state, prompt, generation, client)
            prompt, converted = fitted.prompt, fitted.messages
            conversation = fitted.kept_items(conversation)  # what the next turn goes on from
        draft = ResponseDraft(record.completion_id, state.settings.model_name,
                              _echo(body, generation, turn))
        run = BackgroundRun(draft.id, client, generation) if body.background else None

        async def keep(response: dict[str, Any], output_items: list[dict[str, Any]]) -> None:
            # Off the event loop: the response and its output are encoded to be kept.
            entry = await asyncio.to_thread(with_output, response, client, input_items,
                                            conversation, output_items)
            if run is not None and not run.deleted and await deleted_elsewhere(state, run):
                run.deleted = True  # a DELETE on another replica while it was serialised
            if run is not None and run.deleted:  # checked with no pause before the write
                return
            try:
                response["store"] = await state.responses.add(entry)
                if not response["store"] and run is not None:
                    # Pollers must see it end: its state without the conversation.
                    await state.responses.add(stored_response(
                        too_large(response), client, [], []))
            except StateUnavailable as exc:  # the answer is (being) sent: say so here
                response["store"] = False
                logger.error("response %s not stored: %s", response["id"], exc)
                return
            if not response["store"]:
                logger.warning("response %s not stored: over the per-key byte share",
                               response["id"])

        async def finished(end: Finished) -> None:
            try:
                await settle(end)
            finally:  # the turn is written: the next may start, before the answer's end
                if turn is not None:
                    await turn.aclose()

        async def settle(end: Finished) -> None:
            if run is not None and await superseded(state, run):
                # Cancelled on another replica: that stands (nothing written or appended),
                # and what followers see last says so.
                last = end.body if end.body is not None else end.failed
                if last is not None:
                    stopped(last, "cancelled")
                return
            if end.body is None:
                record.status = end.error_status  # the stream's 200 went out already
                if run is not None and end.failed is not None:
                    await keep(stopped(end.failed, run.stop_reason), end.output)
                return
            record.finish_reason = _finish_reason(end.body)
            if turn is not None:
                await turn.record(input_items, end.output)
            if body.store:
                await keep(end.body, end.output)

        if run is not None:
            if converted is None:  # images decoded now: a bad one is this request's 400
                converted = await to_engine_messages(prompt.messages, state, timer, client,
                                                     prompt.where)
            queued = draft.body("queued", [])
            entry = await asyncio.to_thread(stored_response, queued, client, input_items,
                                            conversation)
            state.background.reserve(client)  # again, and held: others are being created
            try:
                if not await state.responses.add(entry):  # the store out of reach: a 503
                    raise APIError(400, "background: too large for this key's share of the "
                                   "response store", param="background")
            except BaseException:
                state.background.unreserve(client)
                raise
            record.detached = True  # counted and logged when the run ends
            state.background.start(run, run_in_background(
                state, run, record, draft, converted, output, reasoning, finished, keep, turn),
                reserved=True)
            return sse_response(run.follow(None)) if body.stream else JSONResponse(queued)
        events, first = await start_generation(state, generation,
                                               prompt.messages if converted is None else [],
                                               client=client, plan=plan, constraint=constraint,
                                               names=prompt.where, reasoning=reasoning,
                                               converted=converted)
        if isinstance(first, ErrorEvent):
            return error_response(first.status, first.message, code=first.code)

        if body.stream:
            # The turn is released at the answer's end, or after the answer when the
            # stream never started (its generator's `finally` never runs then), or when
            # the hold lapses, counted from now (it may have waited long in the queue).
            if turn is not None:
                turn.lease.touch()
            return sse_response(_stream(draft, first, events, generation, finished, turn),
                                background=BackgroundTask(turn.aclose) if turn else None)
        return await _complete(draft, first, events, plan, finished)
    finally:
        if watcher is not None:
            watcher.cancel()


@router.get("/responses/{response_id:response_id}", response_model=None,
            responses=responses(ResponseObject, 400, 404, content=event_stream(StreamEvent)))
async def get_response(response_id: str, request: Request, stream: bool = False,
                       starting_after: int | None = Query(None, ge=-1)) -> Response:
    """The stored response; with `stream`, a background response's events (after
    `starting_after`), from the replica running it, while it runs and for a few minutes
    after."""
    state: AppState = request.app.state.vlserve
    client = client_identity(request.scope)
    # Without its items: from the shared store, a record's images are not even read.
    stored = await owned_response(state, response_id, client, "response_id", items=False)
    assert stored is not None
    if not stream:  # the JSON it was stored as, in slices: no encode, however large
        return JSONPartsResponse([stored.response_json])
    return later_stream(state, stored, client, starting_after)


@router.delete("/responses/{response_id:response_id}",
               responses=responses(ResponseDeleted, 404))
async def delete_response(response_id: str, request: Request) -> JSONResponse:
    state: AppState = request.app.state.vlserve
    client = client_identity(request.scope)
    run = state.background.get(response_id, client)
    if run is not None:  # a running background response stops and writes nothing more
        run.deleted = True
        run.stop("cancelled")
    else:  # it may be a background response another replica runs: stop it there (first:
        # a mark that cannot be written fails the delete before anything is gone)
        await state.stop_marks.mark(response_id, client, "deleted")
    if not await state.responses.delete(response_id, client):
        raise response_not_found(response_id, "response_id")
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


@router.get("/responses/{response_id}/input_items",
            responses=responses(InputItemList, 400, 404))
async def list_input_items(response_id: str, request: Request, after: str | None = None,
                           limit: int = Query(20, ge=1, le=100),
                           order: Literal["asc", "desc"] = "desc") -> JSONPartsResponse:
    """The request's own input items (earlier turns are their own responses' items),
    cursor-paginated like OpenAI's (`after`, `limit`, `has_more`), spliced from their
    stored JSON."""
    state: AppState = request.app.state.vlserve
    stored = await owned_response(state, response_id, client_identity(request.scope),
                                   "response_id")
    assert stored is not None and stored.input_items is not None
    return JSONPartsResponse(item_page_parts(stored.input_items, order=order, after=after,
                                             limit=limit, holder="response"))


def _response_record(request: Request) -> RequestRecord:
    """The request's record, its id a response id (resp_<hex>) rather than a chat one."""
    record = request_record(request)
    response_id = "resp_" + record.completion_id.removeprefix("chatcmpl-")
    if record.request_id == record.completion_id:
        record.request_id = response_id
    record.completion_id = response_id
    return record


def _echo(body: ResponsesRequest, generation: GenerationRequest,
          turn: ConversationTurn | None) -> dict[str, Any]:
    """The request's settings as the response object repeats them (sampling as applied)."""
    fmt = body.text.format if body.text is not None and body.text.format is not None else None
    return {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "temperature": generation.sampling.temperature,
        "top_p": generation.sampling.top_p,
        "tools": [t.model_dump() for t in body.tools or []],
        "tool_choice": (body.tool_choice.model_dump() if body.tool_choice is not None
                        and not isinstance(body.tool_choice, str)
                        else body.tool_choice or "auto"),
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt
                 else {"type": "text"},
                 **({"verbosity": body.text.verbosity} if body.text and body.text.verbosity
                    else {})},
        "store": body.store,
        "background": body.background,
        "previous_response_id": body.previous_response_id,
        "metadata": body.metadata,
        "conversation": {"id": turn.id} if turn is not None else None,
        "truncation": body.truncation or "disabled",
        "top_logprobs": body.top_logprobs,
        "reasoning": body.reasoning.model_dump() if body.reasoning else None,
        **tier_echo(body.service_tier),
    }


def _top_logprobs(body: ResponsesRequest) -> int | None:
    """How many alternatives each answer token's logprobs show; None: no logprobs."""
    asked = body.include is not None and "message.output_text.logprobs" in body.include
    return (body.top_logprobs or 0) if asked or body.top_logprobs is not None else None


def _finish_reason(body: dict[str, Any]) -> str:
    """The log line's finish_reason, in chat's words."""
    if body["status"] == "incomplete":
        return "length"
    calls = any(item["type"] == "function_call" for item in body["output"])
    return "tool_calls" if calls else "stop"


async def _complete(draft: ResponseDraft, event: Event, events: Events,
                    plan: ToolPlan | None,
                    finished: Callable[[Finished], Awaitable[None]]
                    ) -> Response:
    whole = await whole_answer(event, events)
    if isinstance(whole, ErrorEvent):
        return error_response(whole.status, whole.message, code=whole.code)
    done, text = whole.done, whole.text
    content: str | None = text
    calls: list[dict[str, Any]] = []
    logprobs = whole.logprobs
    if plan is not None:
        # With calls parsed out, the logprobs are those of the text shown, as streamed.
        message, _, logprobs = answer_message(text, done.finish_reason, whole.logprobs,
                                              whole.spans, json_answer=plan.json_answer)
        content = message["content"]  # type: ignore[assignment]
        calls = message.get("tool_calls", [])  # type: ignore[assignment]
    status = status_of(done.finish_reason)
    output = answer_items(content, calls, status, logprobs=logprobs, reasoning=whole.reasoning)
    body = draft.body(status, output, timer=done.timer, finish_reason=done.finish_reason)
    await finished(Finished(body, output))
    return JSONResponse(body, headers={"Server-Timing": done.timer.server_timing_header()})


async def _stream(draft: ResponseDraft, first: Event, events: Events,
                  generation: GenerationRequest,
                  finished: Callable[[Finished], Awaitable[None]],
                  turn: ConversationTurn | None) -> AsyncIterator[str]:
    if turn is not None:
        turn.lease.pin()  # from here on, this `finally` gives it back
    try:
        async for line in stream_events(draft, first, events, finished):
            yield line
    finally:
        # A client that went away must not keep the engine busy (set synchronously: a
        # cancelled task cannot await).
        generation.cancelled.set()
        if turn is not None:
            turn.release()
