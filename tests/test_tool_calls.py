"""Function calling end to end on the demo models: random weights plus the grammar must make
a valid call every time `tool_choice` asks for one, streamed or not; `auto` may answer in
text; bad tool definitions are 400s naming the field."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from conftest import CONSTRAINED_MAX_TOKENS, RunningServer

from server.api.protocol import ChatMessageIn
from server.api.tool_calls import ToolPlan, tool_history
from server.engine.tools import (
    ArgumentsDelta,
    CallStart,
    Function,
    TextDelta,
    ToolCallParser,
    parse_answer,
)

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"],
         "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def client(constrained_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=constrained_server.api, api_key="unused", max_retries=0,
                         timeout=120)


def call(client: openai.OpenAI, seed: int, **extra: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(  # type: ignore[call-overload, no-any-return]
        model="m", messages=extra.pop("messages", ASK), tools=TOOLS, seed=seed,
        max_tokens=extra.pop("max_tokens", CONSTRAINED_MAX_TOKENS), temperature=1.0, **extra)


def assert_valid_calls(message: object, names: set[str]) -> list[tuple[str, dict]]:
    calls = getattr(message, "tool_calls", None)
    assert calls, message
    out = []
    for tool_call in calls:
        assert tool_call.type == "function" and tool_call.id.startswith("call_")
        assert tool_call.function.name in names
        arguments = json.loads(tool_call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[tool_call.function.name])
        out.append((tool_call.function.name, arguments))
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_required_makes_one_valid_call(client: openai.OpenAI, seed: int) -> None:
    reply = call(client, seed, tool_choice="required", parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(assert_valid_calls(choice.message, set(SCHEMAS))) == 1
    assert choice.message.content is None


def test_a_named_function_is_the_one_called(client: openai.OpenAI) -> None:
    reply = call(client, 3, tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = assert_valid_calls(reply.choices[0].message, {"get_time"})
    assert {name for name, _ in calls} == {"get_time"}


def test_parallel_calls_are_each_valid(client: openai.OpenAI) -> None:
    for seed in (4, 5, 6):
        reply = call(client, seed, tool_choice="required")
        assert reply.choices[0].finish_reason == "tool_calls"
        assert_valid_calls(reply.choices[0].message, set(SCHEMAS))


def test_streamed_call_matches_the_whole_answer(client: openai.OpenAI) -> None:
    whole = call(client, 7, tool_choice="required", parallel_tool_calls=False)
    stream = call(client, 7, tool_choice="required", parallel_tool_calls=False, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for piece in choice.delta.tool_calls or []:
                if piece.id is not None:  # a call's first chunk: id, type and name
                    assert piece.index not in calls and piece.type == "function"
                    calls[piece.index] = {"name": piece.function.name, "arguments": ""}
                calls[piece.index]["arguments"] += piece.function.arguments or ""
            assert not choice.delta.content
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    expected = whole.choices[0].message.tool_calls
    assert expected and [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in expected]


def test_auto_without_a_call_is_plain_text(client: openai.OpenAI) -> None:
    """Random weights never write the marker on their own: `auto` answers in text, and the
    grammar keeps the marker out of it unless a valid call follows."""
    reply = call(client, 8, tool_choice="auto", max_tokens=30)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    assert choice.message.content and "<tool_call>" not in choice.message.content


def test_history_with_calls_and_results_is_served(client: openai.OpenAI) -> None:
    first = call(client, 9, tool_choice="required", parallel_tool_calls=False)
    made = first.choices[0].message.tool_calls
    assert made
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": made[0].id, "type": "function", "function": {
            "name": made[0].function.name, "arguments": made[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": made[0].id, "content": "21 C and sunny"}]
    reply = call(client, 9, messages=history, tool_choice="none", max_tokens=8)
    assert reply.choices[0].finish_reason == "length"  # text, no call, to its max_tokens
    bare = call(client, 9, tool_choice="none", max_tokens=8)
    # The call and its result are in the prompt (rendered as text turns).
    assert reply.usage and bare.usage
    assert reply.usage.prompt_tokens > bare.usage.prompt_tokens + 20


@pytest.mark.parametrize(("extra", "param", "says"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}}}]},
     "tools.0.function.parameters", "#/properties/n/minimum"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "nope"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "unique"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "string"}}}]}, "tools.0.function.parameters", "type object"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools.0.function.name", ""),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id", "call"),
    # An image in an assistant turn that made calls was dropped without a word.
    ({"messages": [*ASK, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}], "tool_calls": [{
            "id": "c1", "type": "function", "function": {"name": TOOLS[0]["function"]["name"],
                                                         "arguments": "{}"}}]}]},
     "messages.1.content", "only accepted in user messages and tool results"),
])
def test_bad_tool_requests_are_400s(constrained_server: RunningServer, extra: dict, param: str,
                                    says: str) -> None:
    body = {"messages": ASK, "tools": TOOLS, "max_tokens": 4, **extra}
    response = httpx.post(f"{constrained_server.api}/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_tool_requests_are_counted(constrained_server: RunningServer,
                                   client: openai.OpenAI) -> None:
    def count() -> float:
        for line in httpx.get(f"{constrained_server.url}/metrics", timeout=10).text.splitlines():
            if line.startswith('vlserve_constrained_requests_total{kind="tools"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = count()
    call(client, 10, tool_choice="required", parallel_tool_calls=False)
    assert count() - before == 1


# Pure logic: the parser and the history rendering.

CALLS_TEXT = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": '
              '{"city": "Pa\\"ris}", "n": [1, {}]}}\n</tool_call>\n<tool_call>\n'
              '{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>')


def test_parser_streams_what_the_whole_parse_finds() -> None:
    whole = parse_answer(CALLS_TEXT)
    assert whole.content == "Let me look.\n"
    assert [(c.name, c.arguments) for c in whole.calls] == [
        ("get_weather", '{"city": "Pa\\"ris}", "n": [1, {}]}'), ("get_time", '{"utc": true}')]
    parser = ToolCallParser()
    deltas = [d for ch in CALLS_TEXT for d in parser.feed(ch)] + parser.finish()
    assert "".join(d.text for d in deltas if isinstance(d, TextDelta)) == whole.content
    starts = [d for d in deltas if isinstance(d, CallStart)]
    assert [s.call.name for s in starts] == ["get_weather", "get_time"]
    for i, expected in enumerate(whole.calls):
        streamed = "".join(d.text for d in deltas if isinstance(d, ArgumentsDelta)
                           and d.index == i)
        assert streamed == expected.arguments


@pytest.mark.parametrize("text", [
    "no call at all",
    "a <tool_ca",  # maybe a marker's beginning, cut short: text where text may come
    "a <tool_call> that is just talk",
])
def test_text_that_is_not_a_whole_call_stays_text(text: str) -> None:
    parsed = parse_answer(text)
    assert parsed.content == text and not parsed.calls


def test_history_renders_calls_results_and_the_tool_prompt() -> None:
    messages = [ChatMessageIn(role="system", content="Be brief."), *(
        ChatMessageIn.model_validate(m) for m in [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1",
             "type": "function", "function": {"name": "get_weather",
                                              "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}])]
    plan = ToolPlan([Function("get_weather", "Weather in a city", WEATHER)], False, "")
    rendered = tool_history(messages, plan)
    assert [m.role for m in rendered] == ["system", "user", "assistant", "user"]
    assert rendered[0].content.startswith("Be brief.\n\nYou can call these functions:")  # type: ignore[union-attr]
    assert '"name": "get_weather"' in rendered[0].content  # type: ignore[operator]
    assert rendered[2].content == ('<tool_call>\n{"name": "get_weather", "arguments": '
                                   '{"city": "Oslo"}}\n</tool_call>')
    assert rendered[3].content == "<tool_response>\n-3 C\n</tool_response>"


def test_errors_name_the_clients_own_message_when_a_tool_prompt_comes_first(
        constrained_server: RunningServer) -> None:
    """The tool prompt's system turn is put first; a bad part must still be named by the
    index the client sent it at."""
    body = {"tools": TOOLS, "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"},
                                     {"type": "image_url", "image_url": {"url": "data:,x"}}]}]}
    response = httpx.post(f"{constrained_server.api}/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith("messages.0.content.1")
