"""A tool that returns an image (a screenshot): a Responses `function_call_output` whose
`output` is a list of parts (OpenAI's ResponseFunctionCallOutputItemList), its images
counted in the prompt as a user's are, by data URL and by upload, on every model family;
bad parts refused by name; the list kept as sent by stored responses and conversations.
Chat's tool messages take image parts alike (both are shown as the same user turn)."""

from __future__ import annotations

import io

import httpx
import openai
import pytest
from conftest import RunningServer
from helpers import data_url, expected_image_tokens, photo_bytes
from helpers import responses_create as create
from openai.types.responses import ResponseFunctionToolCallOutputItem

WIDTH, HEIGHT = 320, 240
CALL = {"type": "function_call", "call_id": "call_shot", "name": "take_screenshot",
        "arguments": "{}"}
ASK = {"role": "user", "content": "What is on my screen?"}


def sdk(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)


def tool_turn(*parts: dict) -> list[dict]:
    """The user's ask, the model's call, and the call's output as `parts`."""
    return [ASK, CALL, {"type": "function_call_output", "call_id": "call_shot",
                        "output": [{"type": "input_text", "text": "The screenshot:"}, *parts]}]


def image_tokens(reply: object) -> int:
    return reply.model_extra["timings"]["image_tokens"]  # type: ignore[attr-defined]


def test_a_tool_output_image_is_in_the_prompt_on_every_family(
        family_server: RunningServer) -> None:
    """`detail` sizes it as a user image's: the projector's own count for `low`."""
    server = family_server
    png = photo_bytes(WIDTH, HEIGHT)
    image = {"type": "input_image", "image_url": data_url(png), "detail": "low"}
    reply = sdk(server).responses.create(model="m", input=tool_turn(image),  # type: ignore[arg-type]
                                         max_output_tokens=2, temperature=0)
    assert image_tokens(reply) == expected_image_tokens(server.family, WIDTH, HEIGHT, "low")
    text_only = sdk(server).responses.create(model="m", input=tool_turn(),  # type: ignore[arg-type]
                                             max_output_tokens=2, temperature=0)
    assert image_tokens(text_only) == 0
    assert reply.usage is not None and text_only.usage is not None
    assert reply.usage.input_tokens > text_only.usage.input_tokens + image_tokens(reply) // 2


def test_a_tool_output_image_by_file_id(server: RunningServer) -> None:
    client = sdk(server)
    png = photo_bytes(WIDTH, HEIGHT, seed=7)
    upload = client.files.create(file=("shot.png", io.BytesIO(png), "image/png"),
                                 purpose="vision")  # type: ignore[arg-type]
    by_file = client.responses.create(model="m", max_output_tokens=2, input=tool_turn(  # type: ignore[arg-type]
        {"type": "input_image", "file_id": upload.id}))
    by_url = client.responses.create(model="m", max_output_tokens=2, input=tool_turn(  # type: ignore[arg-type]
        {"type": "input_image", "image_url": data_url(png)}))
    want = expected_image_tokens("llava", WIDTH, HEIGHT)
    assert image_tokens(by_file) == image_tokens(by_url) == want
    assert by_file.usage is not None and by_url.usage is not None
    assert by_file.usage.input_tokens == by_url.usage.input_tokens


@pytest.mark.parametrize(("part", "param", "words"), [
    ({"type": "input_image"}, "input.2.output.1", "exactly one of image_url and file_id"),
    ({"type": "input_file", "file_id": "file-x"}, "input.2.output.1",
     "input_file parts are not supported"),
    ({"type": "input_image", "file_id": "file-x"}, "input.2.output.1.file.file_id",
     "no uploaded file 'file-x'"),
    ({"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
     "input.2.output.1.image_url", "input.2.output.1.image_url"),
])
def test_a_bad_output_part_is_named(server: RunningServer, part: dict, param: str,
                                    words: str) -> None:
    answer = httpx.post(f"{server.api}/responses", timeout=60, json={
        "model": "m", "max_output_tokens": 1, "input": tool_turn(part)})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_stored_items_keep_the_list_output(server: RunningServer) -> None:
    """Listed as sent (input_image with the `detail` OpenAI's type requires), and read back
    into the prompt by a continuation and by a conversation."""
    client = sdk(server)
    url = data_url(photo_bytes(WIDTH, HEIGHT, seed=3))
    made = create(server, input=tool_turn({"type": "input_image", "image_url": url}),
                  max_output_tokens=2)
    listed = client.responses.input_items.list(made.id, order="asc").data
    output = listed[2]
    assert isinstance(output, ResponseFunctionToolCallOutputItem)
    raw = httpx.get(f"{server.api}/responses/{made.id}/input_items", timeout=30,
                    params={"order": "asc"}).json()["data"][2]
    assert raw["output"] == [{"type": "input_text", "text": "The screenshot:"},
                             {"type": "input_image", "image_url": url, "detail": "auto"}]
    want = expected_image_tokens("llava", WIDTH, HEIGHT)
    assert image_tokens(made) == want
    continued = create(server, previous_response_id=made.id, input="And now?",
                       max_output_tokens=1)
    assert image_tokens(continued) == want  # turn 1's tool image is still in the prompt
    conversation = httpx.post(f"{server.api}/conversations", timeout=30, json={
        "items": tool_turn({"type": "input_image", "image_url": url})}).json()
    items = client.conversations.items.list(conversation["id"], order="asc").data
    assert items[2].output[1].image_url == url  # type: ignore[union-attr]
    on_it = create(server, conversation=conversation["id"], input="And now?",
                   max_output_tokens=1)
    assert image_tokens(on_it) == want
    bad = httpx.post(f"{server.api}/conversations", timeout=30, json={
        "items": tool_turn({"type": "input_file", "file_id": "file-x"})})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "items.2.output.1"


def test_a_chat_tool_message_shows_its_image(server: RunningServer) -> None:
    """The chat path the Responses one is translated onto: a tool result's image is in the
    prompt (it was dropped, its text alone shown)."""
    url = data_url(photo_bytes(WIDTH, HEIGHT, seed=5))
    answer = httpx.post(f"{server.api}/chat/completions", timeout=120, json={
        "model": "m", "max_tokens": 1, "messages": [
            {"role": "user", "content": "What is on my screen?"},
            {"role": "assistant", "tool_calls": [{"id": "call_shot", "type": "function",
                                                  "function": {"name": "take_screenshot",
                                                               "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_shot", "content": [
                {"type": "text", "text": "The screenshot:"},
                {"type": "image_url", "image_url": {"url": url}}]}]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["timings"]["image_tokens"] == expected_image_tokens(
        "llava", WIDTH, HEIGHT)
