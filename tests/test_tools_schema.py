"""`tools` together with a JSON response format (what the OpenAI Agents SDK sends for an
agent with tools and an output_type): with `tool_choice` `auto` the answer is either valid
calls or a document valid against the schema, never free text; `required` or a named
function is calls only. Random weights plus the grammar must give one of the two on every
seed, through chat (whole, streamed, the SDK's parse()) and the Responses API."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from conftest import CONSTRAINED_MAX_TOKENS, RunningServer
from helpers import response_events
from helpers import responses_create as create
from pydantic import BaseModel, ConfigDict
from test_tool_calls import ASK, SCHEMAS, TOOLS, assert_valid_calls

from server.engine.tools import (
    CallStart,
    Function,
    TextDelta,
    ToolCallParser,
    parse_answer,
    tools_grammar,
)

# Bounded, so a random-weight document always ends within the token limit.
FORECAST = {"type": "object", "properties": {
    "city": {"enum": ["Paris", "Oslo"]}, "sunny": {"type": "boolean"},
    "note": {"type": "string", "maxLength": 8}},
    "required": ["city", "sunny", "note"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST,
                                                 "strict": True}}
SEEDS = range(1, 13)
# Seeds tried until both branches were seen: random weights take both ways, but how often
# each depends on the server's state (what its batches and caches hold changes the last
# digits of the logits), so no fixed dozen of seeds is sure to show both.
BOTH_WAYS = range(1, 81)


@pytest.fixture
def client(constrained_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=constrained_server.api, api_key="unused", max_retries=0,
                         timeout=120)


def ask(client: openai.OpenAI, seed: int, **extra: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(  # type: ignore[call-overload, no-any-return]
        model="m", messages=ASK, tools=TOOLS, seed=seed, max_tokens=CONSTRAINED_MAX_TOKENS,
        temperature=1.0, parallel_tool_calls=False,
        response_format=extra.pop("response_format", FORMAT), **extra)


def branch(choice: openai.types.chat.chat_completion.Choice) -> str:
    """'calls' or 'document', each checked whole: nothing else is a valid answer."""
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        assert len(assert_valid_calls(choice.message, set(SCHEMAS))) == 1
        return "calls"
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content or ""), FORECAST)
    return "document"


def test_auto_answers_with_calls_or_a_schema_document(client: openai.OpenAI) -> None:
    branches: list[str] = []
    for seed in BOTH_WAYS:  # the model's first token chooses: random weights go both ways
        branches.append(branch(ask(client, seed, tool_choice="auto").choices[0]))
        if set(branches) == {"calls", "document"}:
            break
    assert set(branches) == {"calls", "document"}, branches


def test_streamed_answers_match_the_whole_ones(client: openai.OpenAI) -> None:
    for seed in SEEDS[:3]:
        whole = ask(client, seed).choices[0]
        content, calls, finish = "", {}, None
        for chunk in ask(client, seed, stream=True):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                for piece in choice.delta.tool_calls or []:
                    if piece.id is not None:
                        calls[piece.index] = [piece.function.name, ""]
                    calls[piece.index][1] += piece.function.arguments or ""
                finish = choice.finish_reason or finish
        assert finish == whole.finish_reason
        assert content == (whole.message.content or "")
        assert list(calls.values()) == [[c.function.name, c.function.arguments]
                                        for c in whole.message.tool_calls or []]


def test_required_and_named_choices_are_calls_only(client: openai.OpenAI) -> None:
    for seed in SEEDS[:3]:
        assert branch(ask(client, seed, tool_choice="required").choices[0]) == "calls"
    named = ask(client, 1, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert {n for n, _ in assert_valid_calls(named.choices[0].message, {"get_time"})} == {
        "get_time"}


def test_json_object_format_beside_tools(client: openai.OpenAI) -> None:
    for seed in SEEDS[:3]:
        choice = ask(client, seed, response_format={"type": "json_object"}).choices[0]
        if choice.message.tool_calls:
            continue
        content = choice.message.content or ""
        if choice.finish_reason == "length":  # random weights may write a long object
            assert content.startswith("{"), choice
        else:
            assert isinstance(json.loads(content), dict), choice


class Forecast(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: Literal["Paris", "Oslo"]
    sunny: bool


class GetWeather(BaseModel):
    """Weather in a city"""

    model_config = ConfigDict(extra="forbid")
    city: Literal["Paris", "Oslo"]
    unit: Literal["c", "f"]


def test_the_sdks_parse_reads_calls_or_the_model(client: openai.OpenAI) -> None:
    """client.chat.completions.parse with a pydantic tool and response_format, as the Agents
    SDK's output_type: either parsed arguments or a parsed Forecast."""
    seen = set()
    for seed in BOTH_WAYS:
        if seen == {"calls", "document"}:
            break
        reply = client.chat.completions.parse(
            model="m", messages=ASK, seed=seed, temperature=1.0,
            max_tokens=CONSTRAINED_MAX_TOKENS, parallel_tool_calls=False,
            tools=[openai.pydantic_function_tool(GetWeather)], response_format=Forecast)
        message = reply.choices[0].message
        if message.tool_calls:
            assert isinstance(message.tool_calls[0].function.parsed_arguments, GetWeather)
            assert message.parsed is None
            seen.add("calls")
        else:
            assert isinstance(message.parsed, Forecast)
            seen.add("document")
    assert seen == {"calls", "document"}


@pytest.mark.parametrize(("extra", "param"), [
    ({}, "response_format.json_schema.schema"),
    ({"tool_choice": "required"}, "response_format.json_schema.schema"),
])
def test_an_unenforceable_answer_schema_is_still_a_400(constrained_server: RunningServer,
                                                       extra: dict, param: str) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}
    body = {"messages": ASK, "tools": TOOLS, "max_tokens": 4, **extra, "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}
    response = httpx.post(f"{constrained_server.api}/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "#/properties/n/minimum" in error["message"], error


# The Responses API: tools beside text.format.

RESPONSES_TOOLS = [{"type": "function", "name": t["function"]["name"],  # type: ignore[index]
                    "description": t["function"].get("description"),  # type: ignore[attr-defined]
                    "parameters": t["function"]["parameters"]} for t in TOOLS]  # type: ignore[index]
TEXT_FORMAT = {"format": {"type": "json_schema", "name": "forecast", "schema": FORECAST,
                          "strict": True}}


def response_branch(output: list[dict]) -> str:
    calls = [item for item in output if item["type"] == "function_call"]
    if calls:
        assert len(calls) == 1 and len(output) == 1, output
        jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS[calls[0]["name"]])
        return "calls"
    [message] = output
    jsonschema.validate(json.loads(message["content"][0]["text"]), FORECAST)
    return "document"


def test_responses_answer_with_calls_or_a_schema_document(
        constrained_server: RunningServer) -> None:
    branches: list[str] = []
    for seed in BOTH_WAYS:
        if set(branches) == {"calls", "document"}:
            break
        reply = create(constrained_server, input="What is the weather in Paris?",
                       tools=RESPONSES_TOOLS, text=TEXT_FORMAT, seed=seed, temperature=1.0,
                       parallel_tool_calls=False, max_output_tokens=CONSTRAINED_MAX_TOKENS)
        assert reply.status == "completed", reply
        branches.append(response_branch(reply.model_dump()["output"]))
    assert set(branches) == {"calls", "document"}, branches


def test_streamed_responses_end_as_the_whole_ones(constrained_server: RunningServer) -> None:
    for seed in SEEDS[:3]:
        body = {"model": "m", "input": "What is the weather in Paris?", "seed": seed,
                "tools": RESPONSES_TOOLS, "text": TEXT_FORMAT, "temperature": 1.0,
                "parallel_tool_calls": False, "max_output_tokens": CONSTRAINED_MAX_TOKENS}
        events = response_events(constrained_server.api, body)
        assert events[-1]["type"] == "response.completed"
        response_branch(events[-1]["response"]["output"])


def test_responses_parse_reads_calls_or_the_model(client: openai.OpenAI) -> None:
    seen = set()
    for seed in BOTH_WAYS:
        if seen == {"calls", "document"}:
            break
        reply = client.responses.parse(
            model="m", input="What is the weather in Paris?", temperature=1.0,
            max_output_tokens=CONSTRAINED_MAX_TOKENS, parallel_tool_calls=False,
            tools=[openai.pydantic_function_tool(GetWeather)],  # type: ignore[list-item]
            text_format=Forecast, extra_body={"seed": seed})
        assert reply.status == "completed", reply
        if any(item.type == "function_call" for item in reply.output):
            seen.add("calls")
        else:
            assert isinstance(reply.output_parsed, Forecast)
            seen.add("document")
    assert seen == {"calls", "document"}


def test_responses_unenforceable_answer_schema_is_a_400(
        constrained_server: RunningServer) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}
    body = {"model": "m", "input": "hi", "tools": RESPONSES_TOOLS, "text": {"format": {
        "type": "json_schema", "name": "n", "schema": schema}}}
    response = httpx.post(f"{constrained_server.api}/responses", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "text.format.schema"


# Pure logic: the grammar's shape and the parser's reading of a document.

MARKED = '{"note": "<tool_call>\\n{\\"name\\": \\"get_time\\"}"}'


def test_a_document_is_content_as_it_comes_even_a_marker_in_a_string() -> None:
    """Without a document branch, the parser holds back a marker's beginning (it may begin a
    call) and drops it if the answer is cut there; in a document it is text: streamed at
    once, and kept when max_tokens or a stop string cuts the document, as response_format
    alone keeps all of its answer."""
    assert parse_answer(MARKED, json_answer=True).content == MARKED
    cut = MARKED[:MARKED.index("_call") + 2]  # '{"note": "<tool_c'
    parser = ToolCallParser(json_answer=True)
    streamed = [d for ch in cut for d in parser.feed(ch)]
    assert "".join(d.text for d in streamed if isinstance(d, TextDelta)) == cut
    assert parse_answer(cut, cut=True, json_answer=True).content == cut
    assert parse_answer(cut, cut=True).content != cut  # the free-text reading drops it


def test_an_answer_that_begins_with_the_marker_is_calls() -> None:
    text = '<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>'
    parser = ToolCallParser(json_answer=True)
    deltas = [d for ch in text for d in parser.feed(ch)] + parser.finish()
    assert [d.call.name for d in deltas if isinstance(d, CallStart)] == ["get_time"]
    assert not [d for d in deltas if isinstance(d, TextDelta)]
    assert parse_answer(text, json_answer=True).calls[0].arguments == '{"utc": true}'


def test_the_grammar_is_calls_or_the_document_from_the_first_token() -> None:
    functions = [Function("get_time", "", SCHEMAS["get_time"])]
    pydantic_like = {"type": "object", "$defs": {"City": {"enum": ["Paris", "Oslo"]}},
                     "properties": {"city": {"$ref": "#/$defs/City"}}, "required": ["city"]}
    grammar = tools_grammar(functions, parallel=False, required=False, answer=pydantic_like)
    root = grammar.splitlines()[0]
    assert root.startswith('root ::= "<tool_call>" calls | ')  # no free text before a call
    assert "answer-City ::=" in grammar and "free-0" not in grammar
    required = tools_grammar(functions, parallel=False, required=True, answer=pydantic_like)
    assert required == tools_grammar(functions, parallel=False, required=True)


def test_an_answer_schema_referring_into_itself_is_enforced_beside_tools(
        client: openai.OpenAI) -> None:
    """A reference outside $defs (`#/properties/a`, what some generators write) pointed at
    nothing once the schema shared a root with the calls: the combination was a 400 though
    the schema alone was accepted. Its target now goes along, and the answer keeps to it."""
    paired = {"type": "object", "properties": {"a": {"enum": ["x", "y"]},
                                               "b": {"$ref": "#/properties/a"}},
              "required": ["a", "b"], "additionalProperties": False}
    shaped = {"type": "json_schema", "json_schema": {"name": "pair", "schema": paired,
                                                     "strict": True}}
    for seed in BOTH_WAYS:
        choice = ask(client, seed, response_format=shaped).choices[0]
        if not choice.message.tool_calls:
            jsonschema.validate(json.loads(choice.message.content or ""), paired)
            return
    pytest.fail("no seed answered with a document")
