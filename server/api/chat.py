"""POST /chat/completions: non-streaming JSON or SSE stream, with per-stage timings."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.api.auth import client_identity
from server.api.chat_keep import Keeper, keeper
from server.api.choices import merge_choices
from server.api.errors import APIError, error_response
from server.api.generation import (
    Event,
    Events,
    cancel_on_disconnect,
    check_choices,
    count_every_choice,
    logprob_entry,
    max_tokens,
    request_sampling,
    require_ready,
    sse_response,
    start_choices,
    stop_strings,
    usage_of,
    whole_answer,
)
from server.api.internal import request_priority
from server.api.legacy_functions import as_tools, legacy_delta, legacy_finish, legacy_message
from server.api.observe import RequestRecord, request_record
from server.api.offloop_json import OffLoopJSONRoute
from server.api.openapi import event_stream, responses
from server.api.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    predicted_text,
)
from server.api.reasoning import ReasoningEvent, plan_reasoning
from server.api.response_format import response_grammar
from server.api.state import AppState
from server.api.template_kwargs import template_kwargs, with_reasoning_effort
from server.api.tool_calls import (
    ToolDeltaEvent,
    ToolPlan,
    answer_message,
    plan_tools,
    tool_history,
)
from server.api.unserved import refuse_unserved, tier_echo
from server.engine import (
    DoneEvent,
    ErrorEvent,
    GenerationRequest,
    TokenEvent,
)
from server.timings import StageTimer

router = APIRouter(route_class=OffLoopJSONRoute)

Choice = tuple[Events, Event]  # a choice's events and its first


_OK = "The completion as JSON or, with `stream: true`, as server-sent events: one " \
    "ChatCompletionChunk per `data:` line (an error object if generation fails midway), " \
    "then `data: [DONE]`"


@router.post("/chat/completions", response_model=None,
             responses=responses(ChatCompletion, 400, 413, 429, 500, 503, 504, ok_description=_OK,
                                 content=event_stream(ChatCompletionChunk)))
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state: AppState = request.app.state.vlserve
    require_ready(state)
    record = request_record(request)
    record.timer = timer = StageTimer()
    record.stream = body.stream
    n = body.n or 1
    check_choices(n, state)
    legacy = body.functions is not None
    body = as_tools(body)
    plan = await plan_tools(body)
    constraint = ("tools", plan.grammar) if plan else await response_grammar(
        body.response_format)
    if body.audio is not None or "audio" in (body.modalities or ()):
        param = "audio" if body.audio is not None else "modalities"
        raise APIError(400, f"{param}: this server answers in text only (no audio output); "
                       "leave out modalities and audio", param=param,
                       code="audio_not_supported")
    refuse_unserved(verbosity=body.verbosity, verbosity_param="verbosity",
                    web_search=body.web_search_options)
    if constraint is not None and body.ignore_eos:
        raise APIError(400, "ignore_eos cannot be combined with a JSON response_format (the "
                       "answer must end where the JSON does)", param="ignore_eos")
    client = client_identity(request.scope)
    kwargs = with_reasoning_effort(template_kwargs(body.chat_template_kwargs),
                                   body.reasoning_effort, state.engine.template)
    reasoning = plan_reasoning(state, kwargs, constrained=constraint is not None)
    generation = GenerationRequest(
        messages=[],
        max_tokens=max_tokens(body.max_completion_tokens or body.max_tokens, state.settings),
        sampling=request_sampling(body, state, constraint[1] if constraint else None),
        stop=stop_strings(body.stop),
        timer=timer,
        request_id=record.request_id,
        client=client,
        top_logprobs=_top_logprobs(body),
        # Reasoning is counted token by token, so a thinking model's tokens come one by one.
        stream=body.stream or reasoning is not None,
        tenant=state.cache_tenant(client),
        priority=request_priority(request.scope),
        template_kwargs=kwargs,
        prediction=predicted_text(body.prediction),
    )
    # Until a streaming response takes over (Starlette then notices hang-ups itself), a
    # client that goes away must cancel its generation: while its images decode, queued,
    # prefilling or, without streaming, the whole answer long.
    watcher = asyncio.create_task(cancel_on_disconnect(request, generation))
    try:
        messages = tool_history(body.messages, plan)
        # Errors name the client's own messages, not a tool prompt's system turn put first.
        names = ["tools"] * (len(messages) - len(body.messages)) + [
            f"messages.{i}.content" for i in range(len(body.messages))]
        choices = await start_choices(state, generation, messages, n, client=client,
                                      plan=plan, constraint=constraint, names=names,
                                      reasoning=reasoning)
        error = next((first for _, first in choices if isinstance(first, ErrorEvent)), None)
        if error is not None:
            generation.cancelled.set()  # the other choices, if any, stop too
            return error_response(error.status, error.message, code=error.code)
        reply = _Reply(record.completion_id, state.settings.model_name, n,
                       tier_echo(body.service_tier))
        keep = keeper(state, body, client)  # None unless `store: true`
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            lines = _stream(reply, choices, generation, include_usage, record, legacy=legacy)
            return sse_response(keep.stream(lines, timer) if keep else lines)
        return await _complete(reply, choices, generation, record, plan=plan,
                               legacy=legacy, keep=keep)
    finally:
        watcher.cancel()


class _Reply:
    """Identity of one completion, shared by all of its chunks."""

    def __init__(self, request_id: str, model: str, n: int, tier: dict[str, str]) -> None:
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.tier = tier
        head = {"id": request_id, "object": "chat.completion.chunk", "created": self.created,
                "model": model, **tier}
        # Per-token chunks are formatted from a prebuilt prefix: one json.dumps per token.
        self.token_prefixes = ["data: " + json.dumps(head)[:-1] + ', "choices": [{"index": '
                               f'{i}, "delta": {{"content": ' for i in range(n)]
        self.head = head


async def _complete(reply: _Reply, choices: list[Choice], generation: GenerationRequest,
                    record: RequestRecord, *, plan: ToolPlan | None, legacy: bool,
                    keep: Keeper | None) -> Response:
    answers = await asyncio.gather(*(_answer(first, events, generation, plan, legacy)
                                     for events, first in choices))
    finished: list[_Answer] = []
    for answer in answers:
        if isinstance(answer, ErrorEvent):
            generation.cancelled.set()
            return error_response(answer.status, answer.message, code=answer.code)
        finished.append(answer)
    timer = generation.timer
    count_every_choice(timer, [a.done.timer for a in finished])
    record.finish_reason = finished[0].finish_reason
    body = {
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "choices": [{"index": i, "message": a.message, "finish_reason": a.finish_reason,
                     "logprobs": a.logprobs} for i, a in enumerate(finished)],
        "usage": usage_of(timer),
        "timings": timer.as_dict(),
        **reply.tier,
    }
    if keep is not None:
        await keep.keep(body)
    return JSONResponse(body, headers={"Server-Timing": timer.server_timing_header()})


async def _answer(event: Event, events: Events, generation: GenerationRequest,
                  plan: ToolPlan | None, legacy: bool) -> _Answer | ErrorEvent:
    """One choice, whole."""
    whole = await whole_answer(event, events)
    if isinstance(whole, ErrorEvent):
        return whole
    done = whole.done
    # With calls parsed out, `content`'s logprobs are those of the text shown, as streamed.
    message, finish_reason, logprobs = answer_message(
        whole.text, done.finish_reason, whole.logprobs, whole.spans,
        json_answer=plan.json_answer) if plan else (
        {"role": "assistant", "content": whole.text}, done.finish_reason, whole.logprobs)
    if legacy:
        message, finish_reason = legacy_message(message, finish_reason)
    if whole.reasoning:
        message["reasoning_content"] = whole.reasoning
    return _Answer(message, finish_reason, {"content": logprobs}
                   if generation.top_logprobs is not None else None, done)


@dataclass(frozen=True)
class _Answer:
    message: dict[str, object]
    finish_reason: str
    logprobs: dict[str, object] | None
    done: DoneEvent


async def _stream(reply: _Reply, choices: list[Choice], generation: GenerationRequest,
                  include_usage: bool, record: RequestRecord, *, legacy: bool
                  ) -> AsyncIterator[str]:
    finished: list[StageTimer] = []
    running = len(choices)
    try:
        for index in range(len(choices)):
            yield _chunk(reply, {"role": "assistant", "content": ""}, None, index=index)
        async for index, event in merge_choices(choices):
            if isinstance(event, TokenEvent):
                if event.logprob is None:
                    yield f"{reply.token_prefixes[index]}{json.dumps(event.text)}}}, " \
                          '"finish_reason": null, "logprobs": null}]}\n\n'
                else:
                    yield _chunk(reply, {"content": event.text}, None, index=index,
                                 logprobs={"content": [logprob_entry(event.logprob)]})
            elif isinstance(event, ToolDeltaEvent):
                delta = legacy_delta(event.delta) if legacy else event.delta
                if delta is not None:
                    yield _chunk(reply, delta, None, index=index)
            elif isinstance(event, ReasoningEvent):
                yield _chunk(reply, {"reasoning_content": event.text}, None, index=index)
            elif isinstance(event, DoneEvent):
                finish = legacy_finish(event.finish_reason) if legacy else event.finish_reason
                if index == 0:
                    record.finish_reason = finish
                finished.append(event.timer)
                yield _chunk(reply, {}, finish, index=index, timings=event.timer.as_dict())
                running -= 1
                if running:
                    continue
                timer = generation.timer  # usage counts every choice; timings: the first's
                count_every_choice(timer, finished)
                if include_usage:
                    yield _chunk(reply, None, None, usage=usage_of(timer), timings=timer.as_dict())
                yield "data: [DONE]\n\n"
                return
            else:
                assert isinstance(event, ErrorEvent)
                record.status = event.status  # the HTTP status (200) went out already
                error = {"message": event.message, "type": "server_error", "param": None,
                         "code": event.code}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
    finally:
        # A client that went away must not keep the engine busy: set synchronously, since
        # awaiting inside a cancelled task is not possible.
        generation.cancelled.set()


def _chunk(reply: _Reply, delta: dict | None, finish: str | None, *, index: int = 0,
           logprobs: dict | None = None, **extra: object) -> str:
    body: dict[str, object] = dict(reply.head)
    body["choices"] = [] if delta is None else [
        {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
    ]
    body.update(extra)
    return f"data: {json.dumps(body)}\n\n"


def _top_logprobs(body: ChatCompletionRequest) -> int | None:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None
