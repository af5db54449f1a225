"""What goes into the engine and what comes back out."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from server.engine.logprobs import PromptLogprobs, TokenLogprob
from server.engine.prediction import Prediction
from server.timings import StageTimer


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    ignore_eos: bool = False  # benchmarks and load tests: always run to max_tokens
    grammar: str | None = None  # GBNF the answer must match (server/engine/constraints.py)
    # (token id, bias added to its logit): OpenAI's logit_bias, checked by the API.
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class ImageInput:
    """Decoded RGB pixels plus the content hash that identifies them in caches."""

    rgb: bytes
    width: int
    height: int
    content_hash: str

    @property
    def cache_id(self) -> str:
        """The identity caches (embeddings, KV prefixes) know it by: the content hash and the
        size it was decoded to, so one image at two `detail` sizes never shares an entry."""
        return f"{self.content_hash}@{self.width}x{self.height}"


@dataclass(frozen=True)
class ChatMessage:
    """A message with images replaced by `image` placeholders in `parts`."""

    role: str
    parts: tuple[str | ImageInput, ...]


@dataclass
class GenerationRequest:
    messages: list[ChatMessage]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    timer: StageTimer = field(default_factory=StageTimer)
    request_id: str = ""
    client: str = ""  # who sent it (server.api.auth.client_identity): /slots shows each its own
    timeout_s: float | None = None  # None: the configured request_timeout
    top_logprobs: int | None = None  # None: no logprobs; k ≥ 0: chosen token plus k best
    # False: the text comes in one event at the end (nobody reads it token by token, so the
    # engine thread makes no per-token hand-off at all).
    stream: bool = True
    # Set from any thread to stop generation at the next step.
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Whose caches (KV prefix, image embeddings) this request may use; "" when all share.
    tenant: str = ""
    # Higher goes first: queued work of a higher priority overtakes lower, and takes a slot
    # from lower-priority running work (preempted, resumed later). Batch jobs run at
    # BATCH_PRIORITY so they only fill slots interactive requests leave idle.
    priority: int = 0
    # The request's chat template variables (chat_template_kwargs), checked by the API.
    template_kwargs: dict[str, Any] | None = None
    # A raw text prompt (POST /completions) instead of `messages`: no chat template, none
    # of its stop strings, no next turn. Its special-token texts are read as such: the
    # whole prompt is the client's own markup.
    prompt: str | None = None
    # The same as token ids (checked by the API), read as they are: nothing added.
    prompt_tokens: tuple[int, ...] | None = None
    # A raw prompt's own tokens scored (echo with logprobs: server/engine/prompt_scores.py),
    # with `top_logprobs` alternatives each.
    prompt_logprobs: bool = False
    # OpenAI's Predicted Outputs: the text the client expects the answer to be mostly
    # (server/engine/prediction.py); `predicted` is its tokens, set when the prompt is
    # prepared (None where the model's memory cannot take back rejected drafts).
    prediction: str | None = None
    predicted: Prediction | None = None
    # Without a prediction: the prompt's text indexed for prompt lookup, drafts taken from
    # the request's own text (server/engine/lookup.py); None where lookup is off.
    looked_up: Prediction | None = None

    @property
    def raw(self) -> bool:
        """A text completion's prompt, not a chat's messages."""
        return self.prompt is not None or self.prompt_tokens is not None


@dataclass(frozen=True)
class PromptTokens:
    """A prompt as the model would read it (POST /tokenize): its text tokens in order, and
    the positions its images take, which have embeddings but no token ids."""

    tokens: tuple[int, ...]
    image_tokens: int
    pieces: tuple[str, ...] | None = None  # each text token's own text, when asked for

    @property
    def count(self) -> int:
        """What the prompt takes of the context: `usage.prompt_tokens` of the same request."""
        return len(self.tokens) + self.image_tokens


INTERACTIVE_PRIORITY = 0
BATCH_PRIORITY = -1


@dataclass(frozen=True)
class TokenEvent:
    text: str
    logprob: TokenLogprob | None = None
    # A scored prompt's scores, complete once it is evaluated: on its first token, so that a
    # stream can send them (with the echo) before the generated tokens.
    prompt_logprobs: PromptLogprobs | None = None


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: Literal["stop", "length", "tool_calls"]
    timer: StageTimer
    prompt_logprobs: PromptLogprobs | None = None  # when the request asked for them


@dataclass(frozen=True)
class ErrorEvent:
    status: int  # HTTP status the API layer should answer with
    message: str
    code: str | None = None


EngineEvent = TokenEvent | DoneEvent | ErrorEvent


class EventSink:
    """Hands events from the engine thread to the request's asyncio queue.

    At most one wake-up of the event loop is pending at a time: while the loop is busy, the
    events of several steps travel together, so a loaded loop costs the engine (and
    llama.cpp's threads, which share the cores) fewer thread switches."""

    __slots__ = ("_loop", "_pending", "_queue", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[EngineEvent]) -> None:
        self._loop = loop
        self._queue = queue
        self._pending: deque[EngineEvent] = deque()
        self._scheduled = False

    def put(self, event: EngineEvent) -> None:  # engine thread
        self._pending.append(event)
        if self._scheduled:
            return
        self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _flush(self) -> None:  # event-loop thread
        # Cleared before draining: an event appended meanwhile schedules its own flush.
        self._scheduled = False
        while self._pending:
            self._queue.put_nowait(self._pending.popleft())
