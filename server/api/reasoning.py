"""A thinking model's answer split into `reasoning_content` and `content`, as llama-server
and vLLM return it: the text between the think markers (`<think>` … `</think>`) is the
reasoning, the rest the answer. Apps show the answer and may show or drop the reasoning;
a tool call or JSON inside the answer is parsed from the answer alone.

Reasoning is recognised only at the start of an answer: either the prompt opened the block
(a template that ends its generation prompt with `<think>`), or the answer opens it before
any other text. Markers may arrive split across tokens; the split holds back only the
text that could still become one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from server.api.state import AppState
from server.engine import DoneEvent, EngineEvent, TokenEvent
from server.engine.prompt import THINK


@dataclass(frozen=True)
class ReasoningEvent:
    """Text of the reasoning (a stream chunk's `delta.reasoning_content`)."""

    text: str


@dataclass(frozen=True)
class Markers:
    start: str
    end: str


def plan_reasoning(state: AppState, template_kwargs: dict[str, Any] | None,
                   constrained: bool) -> Callable[[], ReasoningSplitter] | None:
    """A splitter for each choice of this request, or None: the model does not think
    (or reasoning_format is "none"), or a grammar shapes the answer from its first token
    (the JSON or the tool call is the answer, wherever the template left off)."""
    template = state.engine.template
    if constrained or template is None or not state.engine.info.get("reasoning"):
        return None
    markers = Markers(*THINK)
    opened = template.opens_thinking(template_kwargs)
    return lambda: ReasoningSplitter(markers, opened)


class ReasoningSplitter:
    """Feed the answer's text in pieces; get (is_reasoning, text) pieces back in order."""

    def __init__(self, markers: Markers, opened: bool) -> None:
        self._markers = markers
        # before: nothing seen yet (the answer may open the block); inside; after.
        self._state = "inside" if opened else "before"
        self._held = ""  # text that may be the start of a marker
        self._strip = False  # whitespace right after the end marker is not answer text

    @property
    def inside(self) -> bool:
        return self._state == "inside"

    def feed(self, text: str) -> list[tuple[bool, str]]:
        out: list[tuple[bool, str]] = []
        text = self._held + text
        self._held = ""
        while text:
            if self._state == "after":
                if self._strip:
                    text = text.lstrip()
                    if not text:
                        break
                    self._strip = False
                out.append((False, text))
                break
            if self._state == "before":
                stripped = text.lstrip()
                start = self._markers.start
                if stripped.startswith(start):
                    self._state = "inside"
                    text = stripped[len(start):]
                elif start.startswith(stripped):  # maybe the marker, not whole yet
                    self._held = text
                    break
                else:
                    self._state = "after"  # a plain answer: no reasoning in it
                continue
            end = self._markers.end
            at = text.find(end)
            if at >= 0:
                if at:
                    out.append((True, text[:at]))
                text = text[at + len(end):]
                self._state, self._strip = "after", True
                continue
            keep = _partial_suffix(text, end)
            if len(text) > keep:
                out.append((True, text[:len(text) - keep]))
            self._held = text[len(text) - keep:]
            break
        return out

    def finish(self) -> list[tuple[bool, str]]:
        """What is held back at the end of the answer (a marker that never completed)."""
        held, self._held = self._held, ""
        if not held:
            return []
        return [(self._state == "inside", held)]


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper start of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


async def reasoning_stream(events: AsyncIterator[EngineEvent], splitter: ReasoningSplitter
                           ) -> AsyncIterator[EngineEvent | ReasoningEvent]:
    """The engine's events with the reasoning split off. A token's logprob goes with the
    last answer text it produced; reasoning carries none. The tokens that opened, were
    inside or closed the block are counted as the answer's `reasoning_tokens` (one event
    per token: the caller asks the engine for a stream)."""
    reasoning_tokens = 0
    async for event in events:
        token = isinstance(event, TokenEvent)
        if isinstance(event, TokenEvent):
            was_inside = splitter.inside
            pieces = splitter.feed(event.text)
            reasoning_tokens += was_inside or splitter.inside
        else:  # Done or Error: nothing more will complete a marker
            pieces = splitter.finish()
            if isinstance(event, DoneEvent):
                event.timer.reasoning_tokens = reasoning_tokens
        last_answer = max((i for i, (reasoning, _) in enumerate(pieces) if not reasoning),
                          default=-1)
        for i, (reasoning, text) in enumerate(pieces):
            if reasoning:
                yield ReasoningEvent(text)
            else:
                logprob = event.logprob if isinstance(event, TokenEvent) and i == last_answer \
                    else None
                yield TokenEvent(text, logprob)
        if not token:
            yield event
