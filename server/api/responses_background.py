"""Background responses on the Responses routes: a run from admission to its end, the
cancel route, and a stream read later (the runs themselves: server.api.background)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.auth import client_identity
from server.api.background import KEEP_EVENTS_S, BackgroundRun
from server.api.background_marks import apply as apply_stop
from server.api.conversation_turns import ConversationTurn
from server.api.errors import APIError
from server.api.generation import Event, sse_response, start_generation
from server.api.json_pages import JSONPartsResponse
from server.api.observe import CLIENT_CLOSED, RequestRecord, observe_detached
from server.api.offloop_json import OffLoopJSONRoute
from server.api.openapi import responses
from server.api.reasoning import ReasoningSplitter
from server.api.response_store import StoredResponse, restated
from server.api.responses_output import (
    EventStream,
    Finished,
    ResponseDraft,
    queued_events,
    stream_events,
)
from server.api.responses_prompt import OutputPlan, owned_response
from server.api.responses_protocol import ResponseObject
from server.api.state import AppState
from server.engine import ChatMessage, ErrorEvent
from server.engine.admission import CLIENT_GONE
from server.store import StateUnavailable

router = APIRouter(route_class=OffLoopJSONRoute)
logger = logging.getLogger("vlserve.api")
CANCEL_WAIT_S = 10.0  # a cancelled run ends at the engine's next step: well within this


@router.post("/responses/{response_id}/cancel", responses=responses(ResponseObject, 400, 404))
async def cancel_response(response_id: str, request: Request) -> JSONPartsResponse:
    """Stop a background response: it ends `cancelled`, its output so far kept. One that
    has ended already is answered as it is."""
    state: AppState = request.app.state.vlserve
    client = client_identity(request.scope)
    stored = await owned_response(state, response_id, client, "response_id")
    assert stored is not None
    if not stored.background:
        raise APIError(400, "response_id: only a background response can be cancelled",
                       param="response_id", code="not_background")
    run = state.background.get(response_id, client)
    if run is not None and not run.ended:
        run.stop("cancelled")
        await run.wait_ended(CANCEL_WAIT_S)  # the engine drops it at its next step
    elif stored.status in ("queued", "in_progress"):
        # Run by another replica (sharing the store), or lost with one: its stop mark
        # first (a failure there changes nothing, so a retry marks it again), then the
        # state, which the replica running it keeps when it finishes.
        await state.stop_marks.mark(response_id, client, "cancelled")
        await state.responses.add(await asyncio.to_thread(restated, stored,
                                                          status="cancelled"))
    again = await owned_response(state, response_id, client, "response_id")
    assert again is not None
    return JSONPartsResponse([again.response_json])


# Keeps a response object (and its output items) in the store.
Keep = Callable[[dict[str, Any], list[dict[str, Any]]], Awaitable[None]]


async def run_in_background(state: AppState, run: BackgroundRun, record: RequestRecord,
                            draft: ResponseDraft, converted: list[ChatMessage],
                            output: OutputPlan,
                            reasoning: Callable[[], ReasoningSplitter] | None,
                            finished: Callable[[Finished], Awaitable[None]],
                            keep: Keep, turn: ConversationTurn | None) -> None:
    """A background response's whole run: its events published for streams, its states
    kept in the store (in_progress once admitted, then its end, through `finished`), its
    end counted and logged as its request's (`record`)."""
    try:
        out = EventStream()
        for line in queued_events(draft, out):  # followers see it queued until admitted
            run.publish(line)
        try:
            started = await state.background.in_turn(run, lambda: _room(state), lambda: (
                start_generation(state, run.generation, [], client=run.owner,
                                 plan=output.tools, constraint=output.constraint,
                                 reasoning=reasoning, converted=converted)))
            # Stopped while it waited: ended as the engine ends a request dropped in line.
            events, first = started or (_no_events(), CLIENT_GONE)
        except APIError as refused:  # the server is closing, ...
            events, first = _no_events(), ErrorEvent(refused.status, refused.message,
                                                      code=refused.code)
        if not isinstance(first, ErrorEvent) and not await superseded(state, run):
            await keep(draft.body("in_progress", []), [])
        async for line in stream_events(draft, first, events, finished, out):
            run.publish(line)
    except Exception:  # a bug: the response must still end, for pollers and followers
        logger.exception("background response %s failed", run.response_id)
        failed = draft.body("failed", [], error={
            "code": "server_error", "message": "the server failed on this response"})
        run.publish(EventStream(len(run.lines)).event("response.failed", response=failed))
        with contextlib.suppress(Exception):
            await keep(failed, [])
    finally:
        if turn is not None:
            turn.release()
        if run.stop_reason == "cancelled":
            record.status, record.finish_reason = CLIENT_CLOSED, None
        observe_detached(state.metrics, state.settings.model_name, record)


def _room(state: AppState) -> bool:
    """Whether the engine's queue can take background work: at most half full, so the
    requests clients wait on still find room (and no 429) while background runs wait."""
    return state.engine.queue_depth < max(1, state.settings.max_queue // 2)


async def _no_events() -> AsyncIterator[Event]:
    return
    yield  # an async generator that yields nothing


def stopped(failed: dict[str, Any], reason: str | None) -> dict[str, Any]:
    """A background response's end (changed in place), saying why it was stopped."""
    if reason == "cancelled":
        failed.update(status="cancelled", error=None)
    elif reason == "shutdown":
        failed["error"] = {"code": "server_shutdown",
                           "message": "the server stopped before the response finished"}
    return failed


async def superseded(state: AppState, run: BackgroundRun) -> bool:
    """Whether another replica deleted the response (its stop mark,
    server.api.background_marks) or wrote it cancelled since the run began: then that
    stands (nothing more is written or appended) and the run stops. A cancel mark alone
    stops the run, which then writes its own `cancelled` end (the cancel's write of the
    state may have failed after its mark). A record gone without a mark was evicted: it
    is written again."""
    try:
        stop = await state.stop_marks.read(run)
        if stop is not None:
            apply_stop(run, stop)
        if stop == "deleted":
            return True
        stored = await state.responses.head(run.response_id, run.owner)  # its state only
    except StateUnavailable:
        return False  # the write that follows fails too, and says so in the log
    if stored is None or stored.status != "cancelled":
        return False
    apply_stop(run, "cancelled")
    return True


async def deleted_elsewhere(state: AppState, run: BackgroundRun) -> bool:
    """Whether a DELETE on another replica marked the response (looked at again right
    before a write: the one before it may be hundreds of ms old)."""
    try:
        return await state.stop_marks.read(run) == "deleted"
    except StateUnavailable:
        return False  # the write that follows fails too, and says so in the log


def too_large(response: dict[str, Any]) -> dict[str, Any]:
    """A background response's end when it is too large to keep: its state, no output."""
    return {**response, "status": "failed", "output": [], "error": {
        "code": "response_too_large", "message": "the response (with its conversation) is "
        "larger than this key's share of the response store: it was not kept"}}


def later_stream(state: AppState, stored: StoredResponse, client: str,
                 starting_after: int | None) -> StreamingResponse:
    """A background response's events after `starting_after`, while it runs and for
    KEEP_EVENTS_S after, from the process that runs it."""
    run = state.background.get(stored.id, client)
    if run is None:
        why = "not a background response" if not stored.background else (
            "its events are kept only by the replica that runs it, until "
            f"{KEEP_EVENTS_S:g} s after it ended; read it without stream")
        raise APIError(400, f"stream: {why}", param="stream")
    return sse_response(run.follow(starting_after))


def fail_interrupted(entry: StoredResponse) -> StoredResponse | None:
    """A background response a restart left `queued` or `in_progress` (its run is gone
    with the old process): failed, so pollers see it end; None when it had ended. (Its
    output is still empty then: a small decode.)"""
    if not entry.background or entry.status not in ("queued", "in_progress"):
        return None
    return restated(entry, status="failed", error={
        "code": "server_shutdown", "message": "the server stopped before the response finished"})
