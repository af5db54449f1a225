"""OpenAI's deprecated `functions` / `function_call` on the demo models: served as a one-call
tools request (the grammar makes the call valid), answered in the old shape that older
clients read (`message.function_call`, finish_reason `function_call`), streamed or not;
old-style turns in the conversation are read as tool turns."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from conftest import CONSTRAINED_MAX_TOKENS, RunningServer
from openai.types.chat import ChatCompletion
from test_tool_calls import ASK, SCHEMAS, TOOLS

from server.api.protocol import ChatMessageIn
from server.api.tool_calls import tool_history

FUNCTIONS = [tool["function"] for tool in TOOLS]


@pytest.fixture
def client(constrained_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=constrained_server.api, api_key="unused", max_retries=0,
                         timeout=120)


def call(client: openai.OpenAI, seed: int, **extra: object) -> ChatCompletion:
    return client.chat.completions.create(  # type: ignore[call-overload, no-any-return]
        model="m", messages=extra.pop("messages", ASK), functions=FUNCTIONS, seed=seed,
        max_tokens=extra.pop("max_tokens", CONSTRAINED_MAX_TOKENS), temperature=1.0, **extra)


def test_a_named_function_is_called_in_the_old_shape(client: openai.OpenAI) -> None:
    for seed, name in ((1, "get_weather"), (2, "get_time")):
        choice = call(client, seed, function_call={"name": name}).choices[0]
        assert choice.finish_reason == "function_call"
        message = choice.message
        assert message.tool_calls is None and message.content is None
        assert message.function_call is not None and message.function_call.name == name
        jsonschema.validate(json.loads(message.function_call.arguments), SCHEMAS[name])


def test_the_streamed_call_matches_the_whole_answer(client: openai.OpenAI) -> None:
    named = {"name": "get_weather"}
    whole = call(client, 3, function_call=named).choices[0].message.function_call
    name, arguments, finish = None, "", None
    for chunk in call(client, 3, function_call=named, stream=True):
        for choice in chunk.choices:
            assert choice.delta.tool_calls is None and not choice.delta.content
            piece = choice.delta.function_call
            if piece is not None:
                name = name or piece.name
                arguments += piece.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "function_call"
    assert whole is not None and (name, arguments) == (whole.name, whole.arguments)


def test_auto_and_none_answer_in_text(client: openai.OpenAI) -> None:
    """Random weights never write the call marker on their own: `auto` answers in text."""
    for function_call in ("auto", "none"):
        choice = call(client, 4, function_call=function_call, max_tokens=12).choices[0]
        assert choice.finish_reason in ("stop", "length")
        assert choice.message.function_call is None and choice.message.content


def test_old_style_turns_are_part_of_the_prompt(client: openai.OpenAI) -> None:
    made = call(client, 5, function_call={"name": "get_weather"}).choices[0].message
    assert made.function_call is not None
    history = [*ASK, {"role": "assistant", "content": None, "function_call": {
        "name": made.function_call.name, "arguments": made.function_call.arguments}},
        {"role": "function", "name": "get_weather", "content": "21 C and sunny"}]
    reply = call(client, 5, messages=history, function_call="none", max_tokens=4)
    bare = call(client, 5, function_call="none", max_tokens=4)
    assert reply.usage and bare.usage
    assert reply.usage.prompt_tokens > bare.usage.prompt_tokens + 20


def test_old_style_turns_render_as_tool_turns() -> None:
    legacy = [ChatMessageIn.model_validate(m) for m in [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None,
         "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"role": "function", "name": "get_weather", "content": "-3 C"}]]
    current = [ChatMessageIn.model_validate(m) for m in [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1",
         "type": "function", "function": {"name": "get_weather",
                                          "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}]]
    assert tool_history(legacy, None) == tool_history(current, None)


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": TOOLS}, "functions"),
    ({"functions": None, "function_call": "auto"}, "function_call"),
    ({"function_call": {"name": "nope"}}, "function_call.name"),
    ({"functions": []}, "functions"),
    ({"messages": [{"role": "user", "content": "x", "function_call": {
        "name": "get_time", "arguments": "{}"}}]}, "messages.0.function_call"),
])
def test_bad_function_requests_are_400s(constrained_server: RunningServer, extra: dict,
                                        param: str) -> None:
    body = {"messages": ASK, "functions": FUNCTIONS, "max_tokens": 4, **extra}
    response = httpx.post(f"{constrained_server.api}/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
