"""The reasoning/answer split of a thinking model's text (pure logic: every way the markers
can arrive in pieces). The server end to end is tests/test_reasoning.py."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest

from server.api.reasoning import Markers, ReasoningEvent, ReasoningSplitter, reasoning_stream
from server.engine import DoneEvent, TokenEvent
from server.engine.logprobs import TokenLogprob
from server.timings import StageTimer

THINK = Markers("<think>", "</think>")


def split(pieces: list[str], opened: bool) -> tuple[str, str]:
    splitter = ReasoningSplitter(THINK, opened)
    out = [p for piece in pieces for p in splitter.feed(piece)] + splitter.finish()
    return ("".join(t for r, t in out if r), "".join(t for r, t in out if not r))


def every_split(text: str) -> list[list[str]]:
    """`text` cut at every pair of places: markers arrive whole, split or in one piece."""
    cuts = range(1, len(text))
    return [[text]] + [[text[:a], text[a:b], text[b:]] for a, b in
                       itertools.combinations(cuts, 2)]


@pytest.mark.parametrize(("text", "opened", "reasoning", "answer"), [
    ("<think>weigh it</think>\n\nYes.", False, "weigh it", "Yes."),
    ("\n<think>a < b</think>Yes", False, "a < b", "Yes"),
    ("weigh it</think> Yes.", True, "weigh it", "Yes."),
    ("Just an answer, <think> later is text", False, "", "Just an answer, <think> later is text"),
    ("cut off mid-thought </thi", True, "cut off mid-thought </thi", ""),
    ("<thi", False, "", "<thi"),
    ("<think></think>", False, "", ""),
    ("no end marker at all", True, "no end marker at all", ""),
])
def test_split_whatever_the_pieces(text: str, opened: bool, reasoning: str, answer: str
                                   ) -> None:
    for pieces in every_split(text):
        assert split(pieces, opened) == (reasoning, answer), pieces


def test_events_keep_order_and_the_answer_keeps_its_logprobs() -> None:
    lp = TokenLogprob(b"Yes", -0.5, [])
    done = DoneEvent("stop", StageTimer())

    async def engine() -> AsyncIterator[TokenEvent | DoneEvent]:
        for event in (TokenEvent("<think>hm"), TokenEvent("m</thi"), TokenEvent("nk>"),
                      TokenEvent("Yes", lp), done):
            yield event

    async def collect() -> list[object]:
        return [e async for e in reasoning_stream(engine(), ReasoningSplitter(THINK, False))]

    assert asyncio.run(collect()) == [ReasoningEvent("hm"), ReasoningEvent("m"),
                                      TokenEvent("Yes", lp), done]


def test_reasoning_tokens_are_those_up_to_the_end_of_the_block() -> None:
    async def engine(texts: list[str]) -> AsyncIterator[TokenEvent | DoneEvent]:
        for text in texts:
            yield TokenEvent(text)
        yield DoneEvent("stop", StageTimer())

    async def count(texts: list[str], opened: bool) -> int:
        events = [e async for e in reasoning_stream(engine(texts),
                                                    ReasoningSplitter(THINK, opened))]
        done = events[-1]
        assert isinstance(done, DoneEvent)
        return done.timer.reasoning_tokens

    # The opening token, two inside, the closing one; then two answer tokens.
    assert asyncio.run(count(["<think>", "a", "b", "</think>", "Yes", "."], False)) == 4
    assert asyncio.run(count(["a", "</think>", "Yes"], True)) == 2
    assert asyncio.run(count(["Yes", " <think>"], False)) == 0
