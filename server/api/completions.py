"""POST /completions: OpenAI's (legacy) text completions, as llama-server and vLLM serve them.

The prompt goes to the model as written, without the chat template (a base model such as
Gemma 3 270M base continues text; tools that complete code or run evaluations send raw
prompts), and the answer stops at the client's `stop` strings and the vocabulary's end of
generation only. Sampling, limits, KV prefix reuse, timings and the engine are the chat
path's; the shapes are OpenAI's `text_completion`. A prompt may be token ids, and one
request may carry several prompts (evaluation tools batch them so): each runs as a request
of its own, its choices after the previous prompt's.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, TypeGuard

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.api.auth import client_identity
from server.api.choices import merge_choices
from server.api.errors import APIError, error_response
from server.api.generation import (
    Event,
    Events,
    cancel_on_disconnect,
    check_choices,
    max_tokens,
    request_sampling,
    require_ready,
    sse_response,
    start_choices,
    stop_strings,
    usage_of,
)
from server.api.internal import request_priority
from server.api.messages import checked_text
from server.api.observe import RequestRecord, request_record
from server.api.offloop_json import OffLoopJSONRoute
from server.api.openapi import event_stream, responses
from server.api.protocol import Completion, CompletionRequest
from server.api.state import AppState
from server.engine import DoneEvent, ErrorEvent, GenerationRequest, TokenEvent
from server.engine.logprobs import PromptLogprobs, TokenLogprob
from server.timings import StageTimer

router = APIRouter(route_class=OffLoopJSONRoute)


@router.post("/completions", response_model=None,
             responses=responses(Completion, 400, 413, 429, 500, 503, 504,
                                 content=event_stream(Completion)))
async def completions(body: CompletionRequest, request: Request) -> Response:
    state: AppState = request.app.state.vlserve
    require_ready(state)
    record = request_record(request)
    record.completion_id = "cmpl-" + record.completion_id.removeprefix("chatcmpl-")
    record.timer = timer = StageTimer()
    record.stream = body.stream
    prompts = _prompts(body, state.engine.info.get("n_vocab", 0), state.engine.info["n_ctx"])
    n = body.n or 1
    check_choices(n, state)
    at_once = state.settings.max_queue + state.settings.n_parallel
    if len(prompts) * n > at_once:
        raise APIError(400, f"prompt: {len(prompts)} prompts x n={n} choices are more than "
                       f"this server queues and runs at once ({at_once}); send fewer per "
                       "request", param="prompt")
    if body.best_of is not None and body.best_of != n:
        raise APIError(400, "best_of: only equal to n (every choice generated is returned)",
                       param="best_of")
    if body.suffix:
        raise APIError(400, "suffix: fill-in-the-middle is not supported", param="suffix")
    scored = body.echo and body.logprobs is not None  # the prompt's own tokens too
    client = client_identity(request.scope)
    # Before anything starts: a failure here leaves no generation running.
    texts = [await _text_of(state, prompt) if body.echo else "" for prompt in prompts]
    echoes = [text for text in texts for _ in range(n)]  # each choice's
    # Each prompt is a request of its own (queued, scheduled and cached as one); the first
    # carries the request's id and timer, the others copy its settings and its `cancelled`
    # (one hang-up stops them all).
    first = GenerationRequest(
        messages=[], max_tokens=max_tokens(body.max_tokens, state.settings),
        sampling=request_sampling(body, state), stop=stop_strings(body.stop), timer=timer,
        request_id=record.request_id, client=client, top_logprobs=body.logprobs,
        stream=body.stream, tenant=state.cache_tenant(client),
        priority=request_priority(request.scope), prompt_logprobs=scored)
    generations = [replace(first, prompt=prompt if isinstance(prompt, str) else None,
                           prompt_tokens=None if isinstance(prompt, str) else prompt,
                           timer=timer if i == 0 else StageTimer(),
                           request_id=record.request_id if i == 0
                           else f"{record.request_id}.{i}")
                   for i, prompt in enumerate(prompts)]
    cancelled = first.cancelled
    watcher = asyncio.create_task(cancel_on_disconnect(request, generations[0]))
    try:
        started = await asyncio.gather(*(
            start_choices(state, generation, [], n, client=client, plan=None, constraint=None)
            for generation in generations), return_exceptions=True)
        refused = next((r for r in started if isinstance(r, BaseException)), None)
        if refused is not None:
            cancelled.set()  # the prompts that did start stop too
            raise refused
        choices = [choice for per_prompt in started
                   if not isinstance(per_prompt, BaseException) for choice in per_prompt]
        refused = next((i for i, (_, first) in enumerate(choices)
                        if isinstance(first, ErrorEvent)), None)
        if refused is not None:
            cancelled.set()
            error = choices[refused][1]
            assert isinstance(error, ErrorEvent)
            several = len(prompts) > 1
            where = f"prompt.{refused // n}" if several else "prompt"
            message = f"{where}: {error.message}" if several else error.message
            return error_response(error.status, message, code=error.code,
                                  param=where if error.status == 400 else None)
        head = {"id": record.completion_id, "object": "text_completion",
                "created": int(time.time()), "model": state.settings.model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return sse_response(_stream(head, choices, generations, echoes, include_usage,
                                        record, n))
        return await _complete(head, choices, generations, echoes, record, n)
    finally:
        watcher.cancel()


MAX_PROMPTS = 64  # in one request; each is queued as a request of its own
Prompt = str | tuple[int, ...]


def _prompts(body: CompletionRequest, n_vocab: int, n_ctx: int) -> list[Prompt]:
    """The request's prompts: a string, token ids, or a list of either (OpenAI's forms)."""
    raw = body.prompt
    single = isinstance(raw, str) or (bool(raw) and type(raw[0]) is int)
    items: list[Any] = [raw] if single else raw
    names = ["prompt"] if single else [f"prompt.{i}" for i in range(len(items))]
    if not items:
        raise APIError(400, "prompt: empty", param="prompt")
    if len(items) > MAX_PROMPTS:
        raise APIError(400, f"prompt: at most {MAX_PROMPTS} prompts in one request",
                       param="prompt")
    out: list[Prompt] = []
    for item, name in zip(items, names, strict=True):
        if isinstance(item, str) and item:
            out.append(checked_text(item, name))
        elif isinstance(item, list) and len(item) >= n_ctx:  # before walking the ids
            raise APIError(400, f"{name}: {len(item)} tokens but the context holds "
                           f"{n_ctx - 1}", param=name, code="context_length_exceeded")
        elif _token_ids(item):
            if not (min(item) >= 0 and max(item) < n_vocab):
                j = next(j for j, token in enumerate(item) if not 0 <= token < n_vocab)
                raise APIError(400, f"{name}.{j}: {item[j]} is not a token id of this model "
                               f"(0 to {n_vocab - 1})", param=f"{name}.{j}")
            out.append(tuple(item))
        else:
            raise APIError(400, f"{name}: a non-empty string or list of token ids",
                           param=name)
    return out


def _token_ids(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


async def _text_of(state: AppState, prompt: Prompt) -> str:
    """What `echo` repeats: the prompt's text (token ids as the model reads them, the text
    `logprobs.tokens` join to: control tokens, such as BOS, show no text, as in generated
    text, and the tokenizer's word-start space before the first word is left out)."""
    return prompt if isinstance(prompt, str) else await state.engine.echo(prompt)


def _usage_timer(generations: list[GenerationRequest], completion_tokens: int) -> StageTimer:
    """The first prompt's timer (its timings are the response's), counting every prompt's
    tokens for `usage`, as every choice's completion tokens."""
    timer = generations[0].timer
    if len(generations) > 1:
        timer.prompt_tokens = sum(g.timer.prompt_tokens for g in generations)
        timer.cached_tokens = sum(g.timer.cached_tokens for g in generations)
    timer.completion_tokens = completion_tokens
    return timer


class _Logprobs:
    """OpenAI's completion logprobs: parallel lists, offsets into the choice's text."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    @classmethod
    def of_prompt(cls, scores: PromptLogprobs) -> _Logprobs:
        """The prompt's tokens, the first with no log-probability (nothing predicts it).
        Offsets advance by the text each token completes (a character split over several
        byte tokens counts once, at its last), as the echoed text has it."""
        out = cls(0)
        text = codecs.getincrementaldecoder("utf-8")("replace")
        first = text.decode(scores.texts[0])
        out.tokens.append(scores.texts[0].decode("utf-8", errors="replace"))
        out.token_logprobs.append(None)
        out.top_logprobs.append(None)
        out.text_offset.append(0)
        out.offset = len(first)
        for lp in scores.scored[1:]:
            assert lp is not None
            out.add(lp, text.decode(lp.token))
        return out

    def then(self, generated: _Logprobs) -> _Logprobs:
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(self, name).extend(getattr(generated, name))
        return self

    def add(self, lp: TokenLogprob, text: str) -> None:
        self.tokens.append(lp.token.decode("utf-8", errors="replace"))
        self.token_logprobs.append(lp.logprob)
        self.top_logprobs.append({t.decode("utf-8", errors="replace"): p for t, p in lp.top})
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def as_dict(self) -> dict[str, object]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


async def _complete(head: dict[str, object], choices: list[tuple[Events, Event]],
                    generations: list[GenerationRequest], echoes: list[str],
                    record: RequestRecord, n: int) -> Response:
    out = []
    completion_tokens = 0
    top_logprobs = generations[0].top_logprobs
    prompt_scores: PromptLogprobs | None = None
    for index, (events, event) in enumerate(choices):
        pieces = [echoes[index]]
        logprobs = _Logprobs(len(echoes[index])) if top_logprobs is not None else None
        while isinstance(event, TokenEvent):
            pieces.append(event.text)
            if logprobs is not None and event.logprob is not None:
                logprobs.add(event.logprob, event.text)
            event = await anext(events)
        if isinstance(event, ErrorEvent):
            generations[0].cancelled.set()
            return error_response(event.status, event.message, code=event.code)
        assert isinstance(event, DoneEvent)
        if index % n == 0:  # the prompt's first choice evaluated (and scored) it
            prompt_scores = event.prompt_logprobs
        if prompt_scores is not None and logprobs is not None:
            logprobs = _Logprobs.of_prompt(prompt_scores).then(logprobs)
        completion_tokens += event.timer.completion_tokens
        if index == 0:
            record.finish_reason = event.finish_reason
        out.append({"index": index, "text": "".join(pieces),
                    "finish_reason": event.finish_reason,
                    "logprobs": logprobs.as_dict() if logprobs is not None else None})
    timer = _usage_timer(generations, completion_tokens)
    body = {**head, "choices": out, "usage": usage_of(timer), "timings": timer.as_dict()}
    return JSONResponse(body, headers={"Server-Timing": timer.server_timing_header()})


def _echo_logprobs(choices: list[tuple[Events, Event]], n: int
                   ) -> list[dict[str, object] | None]:
    """Each choice's prompt scores (None: not asked), for its streamed echo: a prompt's
    first choice evaluated (and scored) it, and carries them on its first event; the
    others start from a copy of it."""
    out: list[dict[str, object] | None] = []
    logprobs: dict[str, object] | None = None
    for index, (_, first) in enumerate(choices):
        if index % n == 0:
            scores = first.prompt_logprobs if isinstance(first, TokenEvent | DoneEvent) \
                else None
            logprobs = _Logprobs.of_prompt(scores).as_dict() if scores is not None else None
        out.append(logprobs)
    return out


async def _stream(head: dict[str, object], choices: list[tuple[Events, Event]],
                  generations: list[GenerationRequest], echoes: list[str],
                  include_usage: bool, record: RequestRecord, n: int) -> AsyncIterator[str]:
    def chunk(choice: dict[str, object] | None, **extra: object) -> str:
        body = {**head, "choices": [] if choice is None else [choice], **extra}
        return f"data: {json.dumps(body)}\n\n"

    completion_tokens = 0
    running = len(choices)
    offsets = [len(echo) for echo in echoes]
    echo_logprobs = _echo_logprobs(choices, n)
    try:
        # The echo first, with its prompt's scores when asked (the tokens' offsets go on
        # after it, as in the whole answer).
        for index, echo in enumerate(echoes):
            if echo or echo_logprobs[index] is not None:
                yield chunk({"index": index, "text": echo, "finish_reason": None,
                             "logprobs": echo_logprobs[index]})
        async for index, event in merge_choices(choices):
            if isinstance(event, TokenEvent):
                logprobs = None
                if event.logprob is not None:
                    one = _Logprobs(offsets[index])
                    one.add(event.logprob, event.text)
                    logprobs = one.as_dict()
                offsets[index] += len(event.text)
                yield chunk({"index": index, "text": event.text, "finish_reason": None,
                             "logprobs": logprobs})
            elif isinstance(event, DoneEvent):
                if index == 0:
                    record.finish_reason = event.finish_reason
                completion_tokens += event.timer.completion_tokens
                yield chunk({"index": index, "text": "", "finish_reason": event.finish_reason,
                             "logprobs": None}, timings=event.timer.as_dict())
                running -= 1
                if running:
                    continue
                timer = _usage_timer(generations, completion_tokens)
                if include_usage:
                    yield chunk(None, usage=usage_of(timer), timings=timer.as_dict())
                yield "data: [DONE]\n\n"
                return
            else:
                assert isinstance(event, ErrorEvent)
                record.status = event.status
                error = {"message": event.message, "type": "server_error", "param": None,
                         "code": event.code}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
    finally:
        generations[0].cancelled.set()  # shared by every prompt's generation
