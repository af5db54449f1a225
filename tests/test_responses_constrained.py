"""Structured output and function calls through the Responses API on both demo models:
random weights plus the grammar give a valid JSON answer or a valid call every time, whole
or streamed (each event validated by the SDK's types), and a call's output continues the
conversation through previous_response_id."""

from __future__ import annotations

import json
import time

import jsonschema
import openai
import pytest
from conftest import CONSTRAINED_MAX_TOKENS, RunningServer
from helpers import response_events
from helpers import responses_create as create
from test_structured_outputs import RECEIPT
from test_tool_calls import CLOCK, WEATHER

RECEIPT_FORMAT = {"type": "json_schema", "name": "receipt", "schema": RECEIPT, "strict": True}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
          "parameters": WEATHER},
         {"type": "function", "name": "get_time", "parameters": CLOCK}]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}


@pytest.fixture
def client(constrained_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=constrained_server.api, api_key="unused", max_retries=0,
                         timeout=120)


def test_json_schema_answers_validate(constrained_server: RunningServer) -> None:
    reply = create(constrained_server, input="Fill it in.", text={"format": RECEIPT_FORMAT},
                   max_output_tokens=CONSTRAINED_MAX_TOKENS, temperature=0)
    assert reply.status == "completed", reply
    jsonschema.validate(json.loads(reply.output_text), RECEIPT)
    assert reply.text is not None and reply.text.format is not None
    assert reply.text.format.type == "json_schema"  # the request's format, echoed
    timings = reply.model_extra["timings"]  # type: ignore[index]
    assert timings["grammar"] > 0  # the grammar was consulted on every token


def test_streamed_json_answer_ends_completed(client: openai.OpenAI,
                                             constrained_server: RunningServer) -> None:
    body = {"model": "m", "input": "Fill it in.", "text": {"format": RECEIPT_FORMAT},
            "max_output_tokens": CONSTRAINED_MAX_TOKENS, "temperature": 0}
    events = response_events(constrained_server.api, body)
    assert events[-1]["type"] == "response.completed"
    final_text = events[-1]["response"]["output"][0]["content"][0]["text"]
    jsonschema.validate(json.loads(final_text), RECEIPT)
    with client.responses.stream(model="m", input="Fill it in.",
                                 text={"format": RECEIPT_FORMAT},  # type: ignore[typeddict-item]
                                 max_output_tokens=CONSTRAINED_MAX_TOKENS,
                                 temperature=0) as stream:
        final = stream.get_final_response()  # needs response.completed
    assert final.output_text == final_text  # greedy: the same document either way


def test_json_object_answer_is_an_object(constrained_server: RunningServer) -> None:
    reply = create(constrained_server, input="Any JSON.", text={"format": {
        "type": "json_object"}}, max_output_tokens=CONSTRAINED_MAX_TOKENS, temperature=0)
    if reply.status == "completed":  # an open-ended object may run past the limit
        assert isinstance(json.loads(reply.output_text), dict)
    assert reply.output_text.lstrip().startswith("{")
    assert reply.model_extra["timings"]["grammar"] > 0  # type: ignore[index]


def calls_of(reply: object) -> list[tuple[str, dict]]:
    calls = [item for item in reply.output if item.type == "function_call"]  # type: ignore[attr-defined]
    assert calls, reply
    out = []
    for call in calls:
        assert call.call_id.startswith("call_") and call.id.startswith("fc_")
        arguments = json.loads(call.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.name])
        out.append((call.name, arguments))
    return out


def test_a_forced_call_and_its_output_continue_the_conversation(
        client: openai.OpenAI, constrained_server: RunningServer) -> None:
    first = create(constrained_server, input="What is the weather in Paris?", tools=TOOLS,
                   tool_choice={"type": "function", "name": "get_weather"},
                   parallel_tool_calls=False, max_output_tokens=CONSTRAINED_MAX_TOKENS,
                   temperature=0)
    assert first.status == "completed"
    assert [name for name, _ in calls_of(first)] == ["get_weather"]
    call = first.output[-1]
    # The result goes back as a function_call_output item; the same tools, so the slot's
    # prefix (turn 1's prompt) is reused.
    second = create(constrained_server, previous_response_id=first.id, tools=TOOLS,
                    tool_choice={"type": "function", "name": "get_weather"},
                    parallel_tool_calls=False, max_output_tokens=CONSTRAINED_MAX_TOKENS,
                    temperature=0, input=[{"type": "function_call_output",
                                           "call_id": call.call_id,  # type: ignore[union-attr]
                                           "output": '{"celsius": 21}'}])
    calls_of(second)
    assert first.usage is not None and second.usage is not None
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    items = client.responses.input_items.list(second.id).data
    assert [i.type for i in items] == ["function_call_output"]
    assert items[0].call_id == call.call_id  # type: ignore[union-attr]


def test_a_streamed_call_is_argument_deltas(client: openai.OpenAI,
                                            constrained_server: RunningServer) -> None:
    body = {"model": "m", "input": "What time is it?", "tools": TOOLS,
            "tool_choice": "required", "parallel_tool_calls": False,
            "max_output_tokens": CONSTRAINED_MAX_TOKENS, "temperature": 0}
    events = response_events(constrained_server.api, body)
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress",
                         "response.output_item.added"]
    assert events[2]["item"]["type"] == "function_call"
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    deltas = "".join(e["delta"] for e in events
                     if e["type"] == "response.function_call_arguments.delta")
    done = events[-3]
    item = events[-1]["response"]["output"][-1]
    assert deltas == done["arguments"] == item["arguments"]
    assert done["item_id"] == item["id"] == events[2]["item"]["id"]
    jsonschema.validate(json.loads(deltas), SCHEMAS[item["name"]])
    whole = create(constrained_server, **{k: v for k, v in body.items() if k != "model"})
    assert [(c.name, c.arguments) for c in whole.output  # type: ignore[union-attr]
            if c.type == "function_call"] == [(item["name"], item["arguments"])]


def test_a_background_answer_has_its_calls(client: openai.OpenAI,
                                           constrained_server: RunningServer) -> None:
    """In the background the answer is generated token by token, as a stream: its call
    markup becomes function_call items, not text."""
    body = {"input": "What time is it?", "tools": TOOLS, "tool_choice": "required",
            "parallel_tool_calls": False, "max_output_tokens": CONSTRAINED_MAX_TOKENS,
            "temperature": 0}
    queued = create(constrained_server, background=True, **body)
    assert queued.status == "queued"
    deadline = time.monotonic() + 120
    while (done := client.responses.retrieve(queued.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [call] = done.output
    assert call.type == "function_call", done.output
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
