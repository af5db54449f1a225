"""Tool calls cut short (max_tokens): the streamed deltas, joined, are the whole answer, for
every cut point. As OpenAI's: a call whose name was written stays a call, finish_reason
`length`, its arguments as far as they got (not valid JSON). Before that, the stream held
back what might be markup (a marker's beginning, a call's head, whitespace before them), so
a cut answer shows none of it: its content is what the stream had sent. An answer that ended
by itself with no call shows all its text; whitespace before a call is no content.

The parser and the API layer's two paths are swept over fake token pieces here (pure logic:
random weights never write text and then a call); the demo server is swept end to end, chat
completions and Responses, with tool_choice required (the grammar makes the call), and Gemma
3 270M (a real vocabulary) calling by itself under `auto`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from conftest import RunningServer
from helpers import response_events
from test_real_model import WEATHER_HISTORY, WEATHER_TOOL, gemma, gemma_gguf  # noqa: F401
from test_responses_constrained import TOOLS as RESPONSE_TOOLS
from test_tool_calls import ASK, TOOLS

from server.api.generation import Event, whole_answer
from server.api.reasoning import ReasoningEvent
from server.api.responses import _complete
from server.api.responses_output import Finished, ResponseDraft, stream_events
from server.api.tool_calls import ToolDeltaEvent, ToolPlan, answer_message, tool_stream
from server.engine import DoneEvent, TokenEvent
from server.engine.logprobs import TokenLogprob
from server.timings import StageTimer

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}' \
          '\n</tool_call>'
CLOCK = '<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>'
# Tokens as a real vocabulary cuts them: some straddle text and marker, marker and head.
TOKENS = ["Let", " me", " look", ".\n<", "tool", "_call", '>\n{"', "name", '": "', "get",
          "_weather", '", "', "arguments", '": {"', "city", '": "', "Paris", '", "', "unit",
          '": "c', '"}}\n', "</tool_call>"]
assert "".join(TOKENS) == "Let me look.\n" + WEATHER


@dataclass
class Answer:
    """A chat answer as a client reads it: content, calls (name, arguments), finish, and
    the content's token logprobs."""

    content: str
    calls: list[tuple[str, str]]
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)


def _lp(i: int) -> TokenLogprob:
    return TokenLogprob(f"t{i}".encode(), -float(i), ())


async def _events(tokens: list[str], finish_reason: str, thought: str = "",
                  logprobs: bool = True) -> AsyncIterator[Event]:
    if thought:
        yield ReasoningEvent(thought)
    for i, text in enumerate(tokens):
        yield TokenEvent(text, _lp(i) if logprobs else None)
    yield DoneEvent(finish_reason, StageTimer())  # type: ignore[arg-type]


def streamed(tokens: list[str], finish_reason: str) -> Answer:
    async def run() -> list[Any]:
        return [e async for e in tool_stream(_events(tokens, finish_reason))]

    answer = Answer("", [], "")
    for event in asyncio.run(run()):
        if isinstance(event, TokenEvent):
            answer.content += event.text
            if event.logprob is not None:
                answer.logprobs.append(event.logprob.logprob)
        elif isinstance(event, ToolDeltaEvent):
            [piece] = event.delta["tool_calls"]  # type: ignore[misc]
            if "id" in piece:
                assert piece["index"] == len(answer.calls) and piece["id"].startswith("call_")
                answer.calls.append((piece["function"]["name"], ""))
            name, arguments = answer.calls[piece["index"]]
            answer.calls[piece["index"]] = (name, arguments + piece["function"]["arguments"])
        else:
            assert isinstance(event, DoneEvent)
            answer.finish_reason = event.finish_reason
    return answer


def whole(tokens: list[str], finish_reason: str) -> Answer:
    async def run() -> Answer:
        events = _events(tokens, finish_reason)
        read = await whole_answer(await anext(events), events)
        assert not isinstance(read, Exception) and hasattr(read, "spans")
        message, finish, logprobs = answer_message(read.text, finish_reason, read.logprobs,
                                                   read.spans)
        calls = message.get("tool_calls") or []
        assert all(c["id"].startswith("call_") for c in calls)  # type: ignore[union-attr]
        return Answer(message["content"] or "",  # type: ignore[arg-type]
                      [(c["function"]["name"], c["function"]["arguments"])  # type: ignore[index]
                       for c in calls], finish,  # type: ignore[union-attr]
                      [e["logprob"] for e in logprobs])  # type: ignore[misc]
    return asyncio.run(run())


def cuts(tokens: list[str]) -> list[tuple[list[str], str]]:
    """Every cut by max_tokens, then the answer as it ended by itself."""
    return [(tokens[:k], "length") for k in range(len(tokens))] + [(tokens, "stop")]


@pytest.mark.parametrize("tokens", [
    TOKENS,
    list("Let me look.\n" + WEATHER),
    list("\n \n" + WEATHER),  # whitespace before the call
    ["\n", "\n<tool", "_call>", WEATHER[len("<tool_call>"):]],
    list(WEATHER + "\n" + CLOCK),  # parallel calls
    ["Hi", " <", "b>", "", " <tool", "_", "x", ""],  # no call: all text
    ["", " ", ""],
])
def test_every_cut_streams_what_the_whole_answer_reads(tokens: list[str]) -> None:
    for cut, finish_reason in cuts(tokens):
        assert streamed(cut, finish_reason) == whole(cut, finish_reason), cut


def _cut_at(text: str, tokens: list[str] = TOKENS) -> list[str]:
    """The tokens up to the one that ends where `text` does in the answer."""
    at = "".join(tokens).index(text) + len(text)
    ends = [len("".join(tokens[:k])) for k in range(len(tokens) + 1)]
    return tokens[:ends.index(at)]


@pytest.mark.parametrize(("cut", "finish_reason", "content", "calls"), [
    # Inside the marker: cut, most likely a call's beginning (never shown); ended by itself
    # there, text.
    (["Let", " me", " look", ".\n<", "tool"], "length", "Let me look.\n", []),
    (["Let", " me", " look", ".\n<", "tool"], "stop", "Let me look.\n<tool", []),
    (["Hi", " <"], "length", "Hi ", []),
    # After the marker, before the name is complete: markup, dropped.
    (_cut_at('"name": "get'), "length", "Let me look.\n", []),
    (_cut_at('"arguments'), "length", "Let me look.\n", []),
    # The head is written: a call, its arguments as far as they got (none yet, or part).
    (_cut_at('"arguments": {"'), "length", "Let me look.\n", [("get_weather", '{"')]),
    (_cut_at('"Paris'), "length", "Let me look.\n", [("get_weather", '{"city": "Paris')]),
    # The arguments closed, the close marker not written yet: a whole call.
    (_cut_at('"}}\n'), "length", "Let me look.\n",
     [("get_weather", '{"city": "Paris", "unit": "c"}')]),
    # Whitespace before a call is no content, cut or not; nor is a second call's marker.
    (list("\n\n" + WEATHER[:WEATHER.index('{"city')]), "length", "", [("get_weather", "")]),
    (list("\n\n<tool_call>\n"), "length", "", []),
    (list(WEATHER + "\n<tool_c"), "length", "",
     [("get_weather", '{"city": "Paris", "unit": "c"}')]),
    # Whitespace that is the whole answer is its text when it ended by itself.
    (["\n", " "], "stop", "\n ", []),
    (["\n", " "], "length", "", []),
])
def test_each_cut_position_reads_as_decided(cut: list[str], finish_reason: str, content: str,
                                            calls: list[tuple[str, str]]) -> None:
    answer = whole(cut, finish_reason)
    assert (answer.content, answer.calls) == (content, calls)
    assert streamed(cut, finish_reason) == answer


@pytest.mark.parametrize(("cut", "finish_reason", "finish"), [
    (TOKENS, "stop", "tool_calls"),
    (_cut_at('"}}\n'), "stop", "tool_calls"),  # a stop string after the call's arguments
    (_cut_at('"Paris'), "stop", "stop"),  # a stop string inside them: the call is unfinished
    (_cut_at('"Paris'), "length", "length"),
])
def test_only_whole_calls_finish_as_tool_calls(cut: list[str], finish_reason: str,
                                               finish: str) -> None:
    answer = whole(cut, finish_reason)
    assert answer.calls and answer.finish_reason == finish
    assert streamed(cut, finish_reason) == answer


def _responses(tokens: list[str], finish_reason: str, thought: str = "", tools: bool = True,
               logprobs: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """The response to `tokens` (after reasoning `thought`) whole (its output items) and
    streamed (joined)."""
    draft = ResponseDraft("resp_x", "m", {})
    plan = ToolPlan([], False, "") if tools else None

    async def done(_: Finished) -> None:
        return None

    async def run() -> tuple[dict[str, Any], list[str]]:
        events: AsyncIterator[Event] = _events(tokens, finish_reason, thought, logprobs)
        reply = await _complete(draft, await anext(events), events, plan, done)
        stream = _events(tokens, finish_reason, thought, logprobs)
        if tools:
            stream = tool_stream(stream)
        return json.loads(reply.body), [
            line async for line in stream_events(draft, await anext(stream), stream, done)]

    body, lines = asyncio.run(run())
    events = [json.loads(line.split("data: ", 1)[1]) for line in lines]
    return {"finish": body["status"], "items": _items(body["output"])}, _joined(events)


def test_responses_items_stream_every_cut_as_the_whole_answer() -> None:
    """Text, then a call: each cut's items alike whole and streamed, those another follows
    `completed`, the last one the answer's status."""
    for cut, finish_reason in cuts(TOKENS):
        whole_items, streamed_items = _responses(cut, finish_reason)
        assert streamed_items == whole_items, cut
    whole_items, _ = _responses(_cut_at('"Paris'), "length")
    assert whole_items == {"finish": "incomplete", "items": [
        ("message", "completed", "Let me look.\n"),
        ("function_call", "incomplete", "get_weather", '{"city": "Paris')]}


@pytest.mark.parametrize("tools", [True, False])
@pytest.mark.parametrize("logprobs", [True, False])
@pytest.mark.parametrize("tokens", [
    TOKENS,
    ["", "\u00e9", "", " ok"],  # a first token that is part of a character: no text yet
    ["", ""],
    ["\n", "<tool", "_call>", WEATHER[len("<tool_call>"):]],
])
def test_reasoning_ends_alike_whole_and_streamed(tokens: list[str], logprobs: bool,
                                                 tools: bool) -> None:
    """After reasoning, each cut's items alike whole and streamed: the reasoning item is
    `completed` once the answer has begun, whatever its first tokens show."""
    for cut, finish_reason in cuts(tokens):
        whole_items, streamed_items = _responses(cut, finish_reason, "hm", tools, logprobs)
        assert streamed_items == whole_items, (cut, finish_reason)
    # One token, part of a character: its logprob is shown, so the answer has begun.
    whole_items, _ = _responses([""], "length", "hm", tools, logprobs=True)
    assert whole_items["items"][0] == ("reasoning", "completed", "hm")


# End to end: the demo server, greedy, cut at every token of a required call.

SWEEP_FAMILY = ["llava"]  # one family: the cut logic is the API layer's, not the model's


def _chat_whole(api: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = httpx.post(f"{api}/chat/completions", json=body, timeout=120).json()
    choice = reply["choices"][0]
    message = choice["message"]
    calls = message.get("tool_calls") or []
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    if calls and not message["content"]:
        assert message["content"] is None  # a call-only answer's, as OpenAI's
    return {"content": message["content"] or "", "finish": choice["finish_reason"],
            "calls": [(c["function"]["name"], c["function"]["arguments"]) for c in calls]}


def _chat_streamed(client: openai.OpenAI, body: dict[str, Any]) -> dict[str, Any]:
    content, finish = "", None
    calls: dict[int, list[str]] = {}
    for chunk in client.chat.completions.create(stream=True, **body):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for piece in choice.delta.tool_calls or []:
                if piece.id is not None:
                    assert piece.id.startswith("call_") and piece.type == "function"
                    assert piece.function and piece.index not in calls
                    calls[piece.index] = [piece.function.name or "", ""]
                calls[piece.index][1] += piece.function.arguments or ""  # type: ignore[union-attr]
            finish = choice.finish_reason or finish
    return {"content": content, "finish": finish,
            "calls": [tuple(calls[i]) for i in sorted(calls)]}


def chat_sweep(api: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The whole answer at every max_tokens from 1 until it ends by itself, each checked
    against the same request streamed (greedy: the same answer)."""
    client = openai.OpenAI(base_url=api, api_key="unused", max_retries=0, timeout=120)
    answers: list[dict[str, Any]] = []
    while not answers or answers[-1]["finish"] == "length":
        cut = {**body, "max_tokens": len(answers) + 1}
        answer = _chat_whole(api, cut)
        assert _chat_streamed(client, cut) == answer, cut["max_tokens"]
        answers.append(answer)
        assert len(answers) < 300, "the answer never ended"
    return answers


def _cut_kinds(answers: list[dict[str, Any]]) -> set[str]:
    """Where the cuts fell: before a call's name, in its arguments, after them, or none."""
    seen = set()
    for answer in answers:
        if not answer["calls"]:
            seen.add("no call")
        elif answer["finish"] == "length":
            _, arguments = answer["calls"][-1]
            seen.add("after the arguments" if _is_json(arguments) else "in the arguments")
        else:
            assert answer["finish"] == "tool_calls"
            seen.add("whole")
    return seen


@pytest.mark.parametrize("constrained_server", SWEEP_FAMILY, indirect=True)
def test_chat_streams_every_cut_as_the_whole_answer(constrained_server: RunningServer) -> None:
    answers = chat_sweep(constrained_server.api, {
        "model": "m", "messages": ASK, "tools": TOOLS, "tool_choice": "required",
        "parallel_tool_calls": False, "temperature": 0})
    assert all(answer["content"] == "" for answer in answers)  # the markup is never text
    assert {"no call", "in the arguments", "whole"} <= _cut_kinds(answers)
    assert answers[-1]["finish"] == "tool_calls"


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _responses_body(max_tokens: int) -> dict[str, Any]:
    return {"model": "m", "input": "What time is it?", "tools": RESPONSE_TOOLS,
            "tool_choice": "required", "parallel_tool_calls": False, "temperature": 0,
            "max_output_tokens": max_tokens}


def _items(output: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The output items as a client reads them (ids aside)."""
    return [(item["type"], item["status"], item["content"][0]["text"])
            if item["type"] in ("message", "reasoning") else
            (item["type"], item["status"], item["name"], item["arguments"])
            for item in output]


def _responses_whole(server: RunningServer, max_tokens: int) -> dict[str, Any]:
    reply = httpx.post(f"{server.api}/responses", json=_responses_body(max_tokens),
                       timeout=120).json()
    return {"finish": reply["status"], "items": _items(reply["output"])}


def _responses_streamed(server: RunningServer, max_tokens: int) -> dict[str, Any]:
    return _joined(response_events(server.api, _responses_body(max_tokens)))


def _joined(events: list[dict[str, Any]]) -> dict[str, Any]:
    """A Responses stream's output items, put together from its events."""
    items: dict[int, dict[str, Any]] = {}
    final = None
    for event in events:
        kind, index = event["type"], event.get("output_index")
        if kind == "response.output_item.added":
            items[index] = {**event["item"], "content": [{"text": ""}], "arguments": ""}
        elif kind in ("response.output_text.delta", "response.reasoning_text.delta"):
            items[index]["content"][0]["text"] += event["delta"]
        elif kind == "response.function_call_arguments.delta":
            items[index]["arguments"] += event["delta"]
        elif kind == "response.output_item.done":
            items[index]["status"] = event["item"]["status"]
        elif kind in ("response.completed", "response.incomplete"):
            final = event["response"]
    assert final is not None
    joined = _items([items[i] for i in sorted(items)])
    assert _items(final["output"]) == joined  # the last event's response says the same
    return {"finish": final["status"], "items": joined}


@pytest.mark.parametrize("constrained_server", SWEEP_FAMILY, indirect=True)
def test_responses_stream_every_cut_as_the_whole_answer(constrained_server: RunningServer
                                                        ) -> None:
    answers: list[dict[str, Any]] = []
    while not answers or answers[-1]["finish"] == "incomplete":
        answer = _responses_whole(constrained_server, len(answers) + 1)
        assert _responses_streamed(constrained_server, len(answers) + 1) == answer, answer
        answers.append(answer)
        assert len(answers) < 300, "the answer never ended"
    # Cut before the name: an empty message; from the name on: the call, cut or whole.
    assert {tuple(item[0] for item in a["items"]) for a in answers} == {
        ("message",), ("function_call",)}
    assert answers[-1]["items"][0][:2] == ("function_call", "completed")


# A real vocabulary: Gemma 3 270M calls by itself under `auto` (its tokens straddle the
# marker, the head and the arguments as a real model's do).

@pytest.mark.slow
def test_a_real_models_call_streams_every_cut_as_the_whole_answer(
        gemma: RunningServer) -> None:  # noqa: F811
    answers = chat_sweep(gemma.api, {
        "model": "gemma-3-270m", "messages": WEATHER_HISTORY, "tools": [WEATHER_TOOL],
        "tool_choice": "auto", "parallel_tool_calls": False, "temperature": 0})
    assert all(answer["content"] == "" for answer in answers)  # the markup is never text
    assert {"no call", "in the arguments", "whole"} <= _cut_kinds(answers)
    assert answers[-1]["calls"] == [("get_weather", '{"city": "Paris"}')]
