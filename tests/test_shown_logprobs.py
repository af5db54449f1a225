"""Token logprobs of answers with tool calls: the content's are those of the text shown (not
the call markup's), the same whole or streamed, in chat completions and the Responses API.

Random weights never write the call marker after text of their own, so the answers with text
and calls are fed to the API layer as engine events here (pure logic); the demo servers check
the wiring end to end: answers under `tools` keep their logprobs, streamed or not."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from conftest import RunningServer
from helpers import response_events
from helpers import responses_create as create
from test_responses_constrained import TOOLS as RESPONSE_TOOLS
from test_tool_calls import ASK, TOOLS

from server.api.generation import Event, whole_answer
from server.api.responses import _complete
from server.api.responses_output import Finished, ResponseDraft, stream_events
from server.api.shown_logprobs import StreamedLogprobs
from server.api.tool_calls import ToolDeltaEvent, ToolPlan, answer_message, tool_stream
from server.engine import DoneEvent, TokenEvent
from server.engine.logprobs import TokenLogprob
from server.engine.tools import TextDelta
from server.timings import StageTimer

CALL = '<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>'
# The answer's tokens as the engine gives them: "look.\n<" straddles the text's end and the
# marker but is mostly text; "k<tool" is mostly marker; "" (part of a character, or text
# held back for a stop string) goes with the character after it.
TOKENS = ["Let", " me", "", " look.\n<", "tool_call>\n", CALL[len("<tool_call>\n"):]]
MOSTLY_MARKUP = ["Loo", "k<tool", "_call>\n", CALL[len("<tool_call>\n"):]]


ABOUT = 0.02  # a logprob's drift from one run to the next (batching, cached prompt)


def lp(i: int) -> TokenLogprob:
    return TokenLogprob(f"t{i}".encode(), -float(i), ())


async def _events(tokens: list[str], finish_reason: str = "stop"
                  ) -> AsyncIterator[TokenEvent | DoneEvent]:
    for i, text in enumerate(tokens):
        yield TokenEvent(text, lp(i))
    yield DoneEvent(finish_reason, StageTimer())


def streamed(tokens: list[str], finish_reason: str = "stop") -> list[Any]:
    async def run() -> list[Any]:
        return [event async for event in tool_stream(_events(tokens, finish_reason))]
    return asyncio.run(run())


def whole(tokens: list[str], finish_reason: str = "stop"
          ) -> tuple[dict[str, object], list[dict[str, object]]]:
    async def run() -> tuple[dict[str, object], list[dict[str, object]]]:
        events = _events(tokens, finish_reason)
        answer = await whole_answer(await anext(events), events)
        assert not isinstance(answer, Exception) and hasattr(answer, "spans")
        message, _, logprobs = answer_message(answer.text, finish_reason, answer.logprobs,
                                              answer.spans)
        return message, logprobs
    return asyncio.run(run())


@pytest.mark.parametrize(("tokens", "content", "kept"), [
    (TOKENS, "Let me look.\n", [0, 1, 2, 3]),
    (MOSTLY_MARKUP, "Look", [0]),
])
def test_the_content_carries_its_own_tokens_logprobs(tokens: list[str], content: str,
                                                     kept: list[int]) -> None:
    message, logprobs = whole(tokens)
    assert message["content"] == content and message["tool_calls"]
    assert [entry["logprob"] for entry in logprobs] == [-float(i) for i in kept]
    events = streamed(tokens)
    texts = [e for e in events if isinstance(e, TokenEvent)]
    assert "".join(e.text for e in texts) == content  # the call's markup is no text
    assert [e.logprob for e in texts if e.logprob is not None] == [lp(i) for i in kept]
    # Each logprob rides with its own token's text (or none, for a token without any).
    for event in texts:
        if event.logprob is not None:
            assert event.text in tokens[int(event.logprob.token[1:])]
    assert any(isinstance(e, ToolDeltaEvent) for e in events)
    assert isinstance(events[-1], DoneEvent) and events[-1].finish_reason == "tool_calls"


def test_an_answer_without_calls_keeps_every_tokens_logprob() -> None:
    """Text held back as a possible marker start still brings its token's logprob, and a
    last token with no text of its own is not lost."""
    tokens = ["Hi", " <", "b", "> there", ""]
    message, logprobs = whole(tokens)
    assert message["content"] == "Hi <b> there" and "tool_calls" not in message
    assert len(logprobs) == len(tokens)
    texts = [e for e in streamed(tokens) if isinstance(e, TokenEvent)]
    assert "".join(e.text for e in texts) == "Hi <b> there"
    assert [e.logprob for e in texts if e.logprob is not None] == [
        lp(i) for i in range(len(tokens))]


@pytest.mark.parametrize(("tokens", "content", "kept"), [
    (["Hi", " <tool_call>", '\n{"na'], "Hi ", [0]),
    (["Hi", " <tool_call>"], "Hi ", [0]),
    (["<tool_call>", "\n"], "", []),
])
def test_an_answer_cut_before_a_calls_name_drops_its_markup(
        tokens: list[str], content: str, kept: list[int]) -> None:
    """Cut by max_tokens after the marker, before a call's name: the stream held the markup
    back and drops it (no call without a name, no markup as text), as the whole answer
    reads; the tokens that are mostly markup bring no logprobs."""
    message, logprobs = whole(tokens, "length")
    assert message["content"] == content and "tool_calls" not in message
    assert [entry["logprob"] for entry in logprobs] == [-float(i) for i in kept]
    events = streamed(tokens, "length")
    texts = [e for e in events if isinstance(e, TokenEvent)]
    assert "".join(e.text for e in texts) == content
    assert [e.logprob for e in texts if e.logprob is not None] == [lp(i) for i in kept]
    for event in texts:
        if event.logprob is not None:
            assert event.text in tokens[int(event.logprob.token[1:])]
    assert not any(isinstance(e, ToolDeltaEvent) for e in events)
    assert isinstance(events[-1], DoneEvent) and events[-1].finish_reason == "length"


def test_a_marker_cut_after_a_whole_call_stays_markup() -> None:
    """After a whole call, a second marker cut before its call's name is no text (as in
    the whole answer), and its tokens bring no logprobs."""
    tokens = ["Ok.", CALL, "\n<tool_call>", '\n{"na']
    message, logprobs = whole(tokens, "length")
    assert message["content"] == "Ok." and len(message["tool_calls"]) == 1  # type: ignore[arg-type]
    assert [entry["logprob"] for entry in logprobs] == [0.0]
    events = streamed(tokens, "length")
    texts = [e for e in events if isinstance(e, TokenEvent)]
    assert "".join(e.text for e in texts) == "Ok."
    assert [e.logprob for e in texts if e.logprob is not None] == [lp(0)]


def test_the_rest_is_only_the_shown_texts_tokens() -> None:
    """At the end of an answer without calls, the tokens still undecided bring their
    logprobs only when their text was shown (a last one with no text of its own too)."""
    logprobs = StreamedLogprobs()
    for i, text in enumerate(["Hi", ""]):
        logprobs.token(text, lp(i))
    shown = logprobs.text(TextDelta("Hi", 0))
    assert [e.logprob for e in shown] == [lp(0)]
    assert [e.logprob for e in logprobs.rest()] == [lp(1)]
    logprobs = StreamedLogprobs()
    for i, text in enumerate(["Hi", "<tool_call>"]):
        logprobs.token(text, lp(i))
    logprobs.text(TextDelta("Hi", 0))
    assert logprobs.rest() == []  # never shown: no logprob for it


def _draft() -> ResponseDraft:
    return ResponseDraft("resp_x", "m", {})


async def _done(_: Finished) -> None:
    return None


def test_responses_output_text_carries_the_shown_texts_logprobs() -> None:
    """Whole and streamed: the message's output_text part has the logprobs of its text
    (they were [] with calls), each delta its own tokens', the done events all of them."""
    plan = ToolPlan([], False, "")

    async def run() -> tuple[dict, list[dict]]:
        events: AsyncIterator[Event] = _events(TOKENS)
        answer = await _complete(_draft(), await anext(events), events, plan, _done)
        stream = tool_stream(_events(TOKENS))
        lines = [line async for line in stream_events(_draft(), await anext(stream), stream,
                                                      _done)]
        return json.loads(answer.body), [json.loads(line.split("data: ", 1)[1])
                                         for line in lines]

    body, events = asyncio.run(run())
    assert [item["type"] for item in body["output"]] == ["message", "function_call"]
    part = body["output"][0]["content"][0]
    assert part["text"] == "Let me look.\n"
    assert [entry["logprob"] for entry in part["logprobs"]] == [0.0, -1.0, -2.0, -3.0]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(e["delta"] for e in deltas) == part["text"]
    assert [lp for e in deltas for lp in e["logprobs"]] == part["logprobs"]
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert done["logprobs"] == part["logprobs"]
    assert events[-1]["response"]["output"][0]["content"][0] == part


# End to end on the demo models: an answer under `tools` (random weights write text) keeps
# its tokens' logprobs when streamed, as it does whole.

def test_responses_under_tools_stream_the_logprobs(constrained_server: RunningServer) -> None:
    body: dict[str, object] = {
        "model": "m", "input": "What time is it?", "tools": RESPONSE_TOOLS,
        "tool_choice": "auto", "max_output_tokens": 12, "temperature": 0,
        "include": ["message.output_text.logprobs"], "top_logprobs": 2}
    reply = create(constrained_server, **body)
    assert [item.type for item in reply.output] == ["message"], reply
    part = reply.output[0].content[0]  # type: ignore[union-attr]
    assert part.logprobs and all(len(entry.top_logprobs) == 2 for entry in part.logprobs)
    events = response_events(constrained_server.api, {**body, "stream": True})
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(e["delta"] for e in deltas) == part.text  # greedy: the same answer
    streamed = [entry for e in deltas for entry in e["logprobs"]]
    # The same tokens; their logprobs as near as a second run's (its prompt partly cached).
    assert [(e["token"], pytest.approx(e["logprob"], abs=ABOUT)) for e in streamed] == [
        (entry.token, entry.logprob) for entry in part.logprobs]
    final = events[-1]["response"]["output"][0]["content"][0]["logprobs"]
    assert final == streamed


def test_chat_under_tools_streams_the_logprobs(constrained_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=constrained_server.api, api_key="unused", max_retries=0,
                           timeout=120)
    extra: dict[str, Any] = {"model": "m", "messages": ASK, "tools": TOOLS, "max_tokens": 12,
                             "temperature": 0, "logprobs": True, "top_logprobs": 2}
    reply = client.chat.completions.create(tool_choice="auto", **extra)
    choice = reply.choices[0]
    assert choice.message.content and not choice.message.tool_calls
    assert choice.logprobs is not None and choice.logprobs.content
    chunks = list(client.chat.completions.create(tool_choice="auto", stream=True, **extra))
    pieces = [c.choices[0] for c in chunks if c.choices]
    assert "".join(p.delta.content or "" for p in pieces) == choice.message.content
    streamed = [entry for p in pieces if p.logprobs for entry in p.logprobs.content or []]
    assert [(e.token, pytest.approx(e.logprob, abs=ABOUT)) for e in streamed] == [
        (e.token, e.logprob) for e in choice.logprobs.content]
    # A call with no text: the content is null, and so are its tokens' (they were the
    # markup's).
    called = httpx.post(f"{constrained_server.api}/chat/completions", timeout=120, json={
        **extra, "tool_choice": "required", "parallel_tool_calls": False,
        "max_tokens": 300}).json()["choices"][0]
    assert called["message"]["tool_calls"] and called["message"]["content"] is None
    assert called["logprobs"] == {"content": []}
