"""POST /responses/input_tokens (`client.responses.input_tokens.count`) on the LLaVA demo
model: the count is the `usage.input_tokens` the same POST /responses reports, for text,
instructions, images, tools, previous_response_id, a conversation, and what
`truncation: "auto"` keeps."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from conftest import TEST_N_CTX, RunningServer
from helpers import data_url, expected_image_tokens, photo_bytes
from helpers import responses_create as create
from openai.types.responses import InputTokenCountResponse


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)


def counted(server: RunningServer, **body: Any) -> int:
    answer = httpx.post(f"{server.api}/responses/input_tokens", json={"model": "m", **body},
                        timeout=60)
    assert answer.status_code == 200, answer.text
    return InputTokenCountResponse.model_validate(answer.json()).input_tokens


def used(server: RunningServer, **body: Any) -> int:
    reply = create(server, max_output_tokens=1, **body)
    assert reply.usage is not None
    return reply.usage.input_tokens


WEATHER = {"type": "function", "name": "weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}


@pytest.mark.parametrize("body", [
    {"input": "Describe a cat."},
    {"input": "Describe a cat.", "instructions": "Be brief."},
    {"input": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
               {"role": "user", "content": "Weather in Oslo?"}], "tools": [WEATHER]},
    {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": data_url(photo_bytes(64, 48)), "detail": "low"}]}]},
])
def test_the_count_is_the_responses_usage(server: RunningServer, body: dict) -> None:
    assert counted(server, **body) == used(server, **body)


def test_the_sdk_counts_an_image_and_earlier_turns(client: openai.OpenAI,
                                                   server: RunningServer) -> None:
    plain = client.responses.input_tokens.count(model="m", input="What is this?")
    image = data_url(photo_bytes(64, 48))
    with_image = client.responses.input_tokens.count(model="m", input=[{
        "role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                    {"type": "input_image", "image_url": image,
                                     "detail": "auto"}]}])
    assert with_image.object == "response.input_tokens"
    assert with_image.input_tokens - plain.input_tokens >= expected_image_tokens(
        "llava", 64, 48)
    first = create(server, input="Tell me about owls.", max_output_tokens=4)
    follow = {"previous_response_id": first.id, "input": "And bats?"}
    assert counted(server, **follow) == used(server, **follow)
    conversation = client.conversations.create(items=[{"role": "user", "content": "Hello."}])
    create(server, conversation=conversation.id, input="Tell me about owls.",
           max_output_tokens=4)
    on_it = {"conversation": conversation.id, "input": "And bats?"}
    before = counted(server, **on_it)
    assert before == used(server, **on_it)
    assert counted(server, **on_it) > before  # the response was appended; counting was not


def test_the_count_is_of_what_truncation_keeps(server: RunningServer) -> None:
    turns: list[dict] = []
    for i in range(12):  # ~2,400 tokens: over the 1024-token context
        turns += [{"role": "user", "content": f"Question {i}: " + "tell me more " * 30},
                  {"role": "assistant", "content": f"Answer {i}: " + "there is more " * 30}]
    turns.append({"role": "user", "content": "And now?"})
    whole = counted(server, input=turns)
    assert whole > TEST_N_CTX  # counted, though no response could read it
    kept = counted(server, input=turns, truncation="auto")
    assert kept < TEST_N_CTX and kept == used(server, input=turns, truncation="auto")


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"input": "x", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ({"input": "x", "conversation": "conv_nope"}, 404, "conversation"),
    ({"input": "x", "conversation": "conv_x", "previous_response_id": "resp_x"}, 400,
     "conversation"),
    ({"input": []}, 400, "input"),
    ({"input": "x", "tools": [{"type": "function", "name": "f",
                               "parameters": {"type": "object", "not": {}}}]}, 400,
     "tools.0.parameters"),
])
def test_bad_requests_are_named(server: RunningServer, body: dict, status: int,
                                param: str) -> None:
    answer = httpx.post(f"{server.api}/responses/input_tokens", json=body, timeout=30)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == param
