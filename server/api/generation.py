"""What chat completions, text completions and responses share between the request and the
engine: the token limit, the sampler settings, stop strings and usage, starting a generation
and cancelling it on hang-up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from server.api.errors import APIError
from server.api.messages import to_engine_messages
from server.api.protocol import ChatMessageIn, GenerationFields
from server.api.reasoning import ReasoningEvent, ReasoningSplitter, reasoning_stream
from server.api.state import AppState
from server.api.tool_calls import ToolDeltaEvent, ToolPlan, tool_stream
from server.config import Settings
from server.engine import (
    ChatMessage,
    DoneEvent,
    EngineEvent,
    ErrorEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from server.engine.engine import EngineNotReadyError, QueueFullError
from server.engine.logprobs import TokenLogprob
from server.timings import StageTimer

E = TypeVar("E")


def require_ready(state: AppState) -> None:
    if not state.engine.ready:
        raise APIError(503, f"the model is not ready ({state.engine.state.value})",
                       code="model_not_ready", headers={"Retry-After": "5"})


def max_tokens(asked: int | None, settings: Settings) -> int:
    """The configured default when none is asked for, and never more than the cap: a model
    that never stops must not run until the context is full."""
    return min(settings.default_max_tokens if asked is None else asked,
               settings.max_tokens_cap)


def sampling_params(*, temperature: float | None = None, top_p: float | None = None,
                    top_k: int | None = None, min_p: float | None = None,
                    seed: int | None = None, repeat_penalty: float | None = None,
                    presence_penalty: float | None = None,
                    frequency_penalty: float | None = None, ignore_eos: bool | None = None,
                    grammar: str | None = None,
                    logit_bias: tuple[tuple[int, float], ...] = ()) -> SamplingParams:
    """The sampler settings a request asked for, the engine's defaults for the rest."""
    defaults = SamplingParams()
    return SamplingParams(
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        top_k=defaults.top_k if top_k is None else top_k,
        min_p=defaults.min_p if min_p is None else min_p,
        seed=seed,
        repeat_penalty=repeat_penalty or defaults.repeat_penalty,
        presence_penalty=presence_penalty or 0.0,
        frequency_penalty=frequency_penalty or 0.0,
        ignore_eos=bool(ignore_eos),
        grammar=grammar,
        logit_bias=logit_bias,
    )


def request_sampling(body: GenerationFields, state: AppState, grammar: str | None = None
                     ) -> SamplingParams:
    """The sampler settings of a chat or text completion request."""
    return sampling_params(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        seed=body.seed, repeat_penalty=body.repeat_penalty,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        ignore_eos=body.ignore_eos, grammar=grammar,
        logit_bias=logit_biases(body.logit_bias, state.engine.info.get("n_vocab", 0)))


def check_choices(n: int, state: AppState) -> None:
    """`n` choices run in as many slots at once: at most n_parallel."""
    if n > state.settings.n_parallel:
        raise APIError(400, f"n: at most {state.settings.n_parallel} choices (the server's "
                       f"n_parallel slots), not {n}", param="n")


MAX_LOGIT_BIAS = 1024  # entries; OpenAI's own cap is lower


def logit_biases(raw: dict[str, float] | None, n_vocab: int
                 ) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as (token id, bias) pairs; -100 bans the token outright, as OpenAI
    documents it (a finite -100 could still lose to a flat distribution's others)."""
    if not raw:
        return ()
    if len(raw) > MAX_LOGIT_BIAS:
        raise APIError(400, f"logit_bias: at most {MAX_LOGIT_BIAS} tokens", param="logit_bias")
    out = []
    for key, bias in raw.items():
        param = f"logit_bias.{key}"
        if not key.isdigit() or int(key) >= n_vocab:
            raise APIError(400, f"{param}: not a token id of this model (0 to {n_vocab - 1})",
                           param=param)
        if not -100 <= bias <= 100:
            raise APIError(400, f"{param}: a bias is from -100 to 100", param=param)
        out.append((int(key), float("-inf") if bias <= -100 else float(bias)))
    return tuple(out)


def logprob_entry(lp: TokenLogprob) -> dict[str, object]:
    """One token's logprobs as chat (`logprobs.content`) and Responses (`logprobs`) show it."""
    return {
        "token": lp.token.decode("utf-8", errors="replace"),
        "logprob": lp.logprob,
        "bytes": list(lp.token),
        "top_logprobs": [{"token": t.decode("utf-8", errors="replace"), "logprob": p,
                          "bytes": list(t)} for t, p in lp.top],
    }


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > 4:
        raise APIError(400, "stop: at most 4 stop sequences are allowed", param="stop")
    return tuple(s for s in stops if s)


def usage_of(timer: StageTimer) -> dict[str, object]:
    return {
        "prompt_tokens": timer.prompt_tokens,
        "completion_tokens": timer.completion_tokens,
        "total_tokens": timer.prompt_tokens + timer.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": timer.cached_tokens},
        "completion_tokens_details": {
            "reasoning_tokens": timer.reasoning_tokens,
            "accepted_prediction_tokens": timer.accepted_prediction_tokens,
            "rejected_prediction_tokens": timer.rejected_prediction_tokens,
        },
    }


# What a request's usage sums over its `n` choices (its timings are the first choice's).
_PER_CHOICE_COUNTS = ("completion_tokens", "reasoning_tokens", "accepted_prediction_tokens",
                      "rejected_prediction_tokens")


def count_every_choice(timer: StageTimer, choices: Sequence[StageTimer]) -> None:
    """Set the request's token counts to the sums over its choices' timers."""
    for name in _PER_CHOICE_COUNTS:
        setattr(timer, name, sum(getattr(choice, name) for choice in choices))


Event = EngineEvent | ToolDeltaEvent | ReasoningEvent
Events = AsyncIterator[Event]


@dataclass(frozen=True)
class WholeAnswer:
    """A choice's answer, not streamed: its text, reasoning and token logprobs."""

    text: str
    reasoning: str
    logprobs: list[dict[str, object]]
    done: DoneEvent
    # Where each of `logprobs`' tokens stands in `text`: [start, end) (calls parsed out of
    # the text take their tokens' logprobs with them).
    spans: list[tuple[int, int]] = field(default_factory=list)


async def whole_answer(event: Event, events: Events) -> WholeAnswer | ErrorEvent:
    """Read a choice's events (from its first, `event`) to its end."""
    pieces: list[str] = []
    thoughts: list[str] = []
    logprobs: list[dict[str, object]] = []
    spans: list[tuple[int, int]] = []
    at = 0
    while isinstance(event, TokenEvent | ReasoningEvent):
        if isinstance(event, ReasoningEvent):
            thoughts.append(event.text)
        else:
            pieces.append(event.text)
            if event.logprob is not None:
                logprobs.append(logprob_entry(event.logprob))
                spans.append((at, at + len(event.text)))
            at += len(event.text)
        event = await anext(events)
    if isinstance(event, ErrorEvent):
        return event
    assert isinstance(event, DoneEvent)
    return WholeAnswer("".join(pieces), "".join(thoughts), logprobs, event, spans)


async def start_generation(state: AppState, generation: GenerationRequest,
                           messages: list[ChatMessageIn], *, client: str,
                           plan: ToolPlan | None, constraint: tuple[str, str] | None,
                           names: Sequence[str] | None = None,
                           reasoning: Callable[[], ReasoningSplitter] | None = None,
                           converted: list[ChatMessage] | None = None,
                           ) -> tuple[Events, Event]:
    """Decode the messages' images, submit, and wait for the first event: the events (call
    markup already turned into tool-call pieces when streaming) and that first one.
    `converted`: the messages with their images decoded already (then `messages` is [])."""
    [choice] = await start_choices(state, generation, messages, 1, client=client, plan=plan,
                                   constraint=constraint, names=names, reasoning=reasoning,
                                   converted=converted)
    return choice


async def start_choices(state: AppState, generation: GenerationRequest,
                        messages: list[ChatMessageIn], n: int, *, client: str,
                        plan: ToolPlan | None, constraint: tuple[str, str] | None,
                        names: Sequence[str] | None = None,
                        reasoning: Callable[[], ReasoningSplitter] | None = None,
                        converted: list[ChatMessage] | None = None,
                        ) -> list[tuple[Events, Event]]:
    """start_generation for `n` choices of one prompt (evaluated once): each choice's events
    and first event. A refused prompt gives a single choice carrying the error. `reasoning`:
    a thinking model's answers come with their reasoning split off (server/api/reasoning)."""
    generation.messages = converted if converted is not None else await to_engine_messages(
        messages, state, generation.timer, client, names)
    with _admission_errors():  # n > 1 is refused here, a single request at its first event
        streams: list[Events] = [state.engine.generate(generation)] if n == 1 else list(
            await state.engine.generate_choices(generation, n))
    if reasoning is not None:
        streams = [reasoning_stream(events, reasoning()) for events in streams]
    if plan is not None and generation.stream:
        streams = [tool_stream(events, plan.json_answer) for events in streams]
    if constraint is not None:
        state.metrics.constrained_requests.labels(constraint[0]).inc()
    firsts = [await first_event(streams[0])] if n == 1 else await asyncio.gather(
        *(first_event(events) for events in streams))
    return list(zip(streams, firsts, strict=True))


async def first_event(events: AsyncIterator[E]) -> E:
    """The engine's first event, with admission refusals as API errors (429, 503)."""
    with _admission_errors():
        return await anext(events)


@contextmanager
def _admission_errors() -> Iterator[None]:
    try:
        yield
    except QueueFullError as exc:
        raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": "1"}) from None
    except EngineNotReadyError as exc:
        raise APIError(503, str(exc), code="model_not_ready") from None


async def cancel_on_disconnect(request: Request, generation: GenerationRequest) -> None:
    """A non-streaming client that hangs up must not keep a slot busy until max_tokens.

    The body has been read, so the next ASGI message can only be the disconnect: waiting
    for it notices a hang-up at once, with no polling."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            generation.cancelled.set()
            return


def sse_response(lines: AsyncIterator[str], background: BackgroundTask | None = None
                 ) -> StreamingResponse:
    """Server-sent events, as every streaming route sends them (`background` runs once the
    answer is out)."""
    return StreamingResponse(lines, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"}, background=background)
