"""The Conversations API end to end on the LLaVA demo model, with the openai SDK (answers
validated by the SDK's own types): conversations made, read, updated, deleted; their items
added, listed, read, deleted; /responses on a conversation reads its turns (the new turn
costs only its new tokens) and appends its input and output; one response at a time per
conversation."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from conftest import LONG_TOKENS as LONG
from conftest import RunningServer
from helpers import data_url, photo_bytes, response_events
from helpers import responses_create as create
from openai.types.conversations import (
    Conversation,
    ConversationDeletedResource,
    ConversationItem,
    ConversationItemList,
)
from pydantic import TypeAdapter

ITEM: TypeAdapter[ConversationItem] = TypeAdapter(ConversationItem)


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)


def items_of(server: RunningServer, conversation_id: str, **params: object) -> ConversationItemList:
    """GET .../items, the raw JSON validated by the SDK's type."""
    answer = httpx.get(f"{server.api}/conversations/{conversation_id}/items", params=params,
                       timeout=30)
    assert answer.status_code == 200, answer.text
    return ConversationItemList.model_validate(answer.json())


def texts(listed: ConversationItemList) -> list[tuple[str, str]]:
    return [(item.role, item.content[0].text) for item in listed.data]  # type: ignore[union-attr]


def test_a_conversation_and_its_items_are_made_read_changed_and_deleted(
        client: openai.OpenAI, server: RunningServer) -> None:
    made = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "Hello."},
               {"role": "assistant", "content": "Hi."}],
        metadata={"topic": "greetings"})
    raw = httpx.get(f"{server.api}/conversations/{made.id}", timeout=30)
    assert raw.status_code == 200
    assert Conversation.model_validate(raw.json()) == made
    assert made.id.startswith("conv_") and made.metadata == {"topic": "greetings"}
    listed = items_of(server, made.id, order="asc")
    assert texts(listed) == [("user", "Hello."), ("assistant", "Hi.")]
    assert listed.data[1].content[0].type == "output_text"  # type: ignore[union-attr]
    assert texts(items_of(server, made.id)) == [("assistant", "Hi."), ("user", "Hello.")]
    first = listed.data[0].id  # type: ignore[union-attr]

    added = client.conversations.items.create(made.id, items=[
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Bye."}]}])
    assert len(added.data) == 1 and added.data[0].id.startswith("msg_")  # type: ignore[union-attr]
    page = items_of(server, made.id, order="asc", limit=2)
    assert page.has_more and page.last_id == listed.data[1].id  # type: ignore[union-attr]
    rest = items_of(server, made.id, order="asc", after=page.last_id)
    assert texts(rest) == [("user", "Bye.")] and not rest.has_more
    got = httpx.get(f"{server.api}/conversations/{made.id}/items/{first}", timeout=30)
    assert ITEM.validate_python(got.json()).id == first

    changed = client.conversations.update(made.id, metadata={"topic": "farewells"})
    assert changed.metadata == {"topic": "farewells"}
    assert client.conversations.retrieve(made.id).metadata == {"topic": "farewells"}
    assert client.conversations.update(made.id, metadata=None).metadata == {}  # cleared
    client.conversations.update(made.id, metadata={"topic": "farewells"})
    after_delete = httpx.delete(f"{server.api}/conversations/{made.id}/items/{first}",
                                timeout=30)
    assert Conversation.model_validate(after_delete.json()).id == made.id
    assert texts(items_of(server, made.id, order="asc")) == [("assistant", "Hi."),
                                                             ("user", "Bye.")]
    gone_item = httpx.get(f"{server.api}/conversations/{made.id}/items/{first}", timeout=30)
    assert gone_item.status_code == 404 and gone_item.json()["error"]["param"] == "item_id"

    deleted = httpx.delete(f"{server.api}/conversations/{made.id}", timeout=30)
    assert ConversationDeletedResource.model_validate(deleted.json()).deleted
    with pytest.raises(openai.NotFoundError) as gone:
        client.conversations.retrieve(made.id)
    assert gone.value.body["code"] == "conversation_not_found"  # type: ignore[index]


def test_responses_on_a_conversation_read_and_extend_it(client: openai.OpenAI,
                                                        server: RunningServer) -> None:
    conversation = client.conversations.create(
        items=[{"role": "system", "content": "Answer briefly."}])
    first = create(server, conversation=conversation.id, input="Tell me about owls.",
                   max_output_tokens=6, temperature=0)
    assert first.conversation is not None and first.conversation.id == conversation.id
    second = create(server, conversation={"id": conversation.id}, input="And bats?",
                    max_output_tokens=6, temperature=0)
    assert first.usage is not None and second.usage is not None
    # The slot still holds turn 1's prompt and answer: only the new turn is evaluated.
    cached = second.usage.input_tokens_details.cached_tokens
    assert cached >= first.usage.input_tokens
    assert second.usage.input_tokens - cached <= 6 + 20, second.usage
    listed = items_of(server, conversation.id, order="asc")
    assert texts(listed) == [("system", "Answer briefly."), ("user", "Tell me about owls."),
                             ("assistant", first.output_text), ("user", "And bats?"),
                             ("assistant", second.output_text)]
    assert listed.data[2].id == first.output[0].id  # type: ignore[union-attr]
    # The same conversation sent whole is the same prompt, token for token.
    whole = create(server, max_output_tokens=6, temperature=0, input=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Tell me about owls."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And bats?"}])
    assert whole.usage is not None and whole.usage.input_tokens == second.usage.input_tokens
    assert whole.output_text == second.output_text
    # With no new input, the conversation alone is the prompt.
    again = create(server, conversation=conversation.id, max_output_tokens=2)
    assert again.usage is not None and again.usage.input_tokens > second.usage.input_tokens
    assert len(items_of(server, conversation.id).data) == 6


def test_a_stream_on_a_conversation_extends_it_and_an_image_stays_in_it(
        server: RunningServer) -> None:
    conversation = httpx.post(f"{server.api}/conversations", json={}, timeout=30).json()
    png = photo_bytes(40, 30)
    events = response_events(server.api, {
        "model": "m", "conversation": conversation["id"], "max_output_tokens": 3,
        "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": data_url(png)}]}]})
    final = events[-1]["response"]
    assert final["conversation"] == {"id": conversation["id"]}
    listed = items_of(server, conversation["id"], order="asc")
    assert [item.role for item in listed.data] == ["user", "assistant"]  # type: ignore[union-attr]
    image = listed.data[0].content[1]  # type: ignore[union-attr]
    assert image.type == "input_image" and image.image_url == data_url(png)  # type: ignore[union-attr]
    # The next turn (not locked: the stream gave the conversation back) sees the image.
    after = create(server, conversation=conversation["id"], input="And now?",
                   max_output_tokens=1)
    assert after.model_extra["timings"]["image_tokens"] > 0  # type: ignore[index]


def test_one_response_at_a_time_per_conversation(long_server: RunningServer) -> None:
    server = long_server
    conversation = httpx.post(f"{server.api}/conversations", json={}, timeout=30).json()
    body = {"model": "m", "conversation": conversation["id"], "input": "Go on.",
            "max_output_tokens": LONG, "stream": True,
            "temperature": 0}  # greedy: random weights never stop early this way
    started = threading.Event()
    release = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{server.api}/responses", json=body, timeout=120) as answer:
            for line in answer.iter_lines():
                if line.startswith("data: "):
                    started.set()
                    release.wait(60)
                    return  # hangs up mid-stream

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60)
    locked = httpx.post(f"{server.api}/responses", timeout=30, json={
        "model": "m", "conversation": conversation["id"], "input": "Me too.",
        "max_output_tokens": 1})
    assert locked.status_code == 400, locked.text
    error = locked.json()["error"]
    assert error["code"] == "conversation_locked" and error["param"] == "conversation"
    # Another conversation is not held up.
    other = httpx.post(f"{server.api}/conversations", json={}, timeout=30).json()
    assert create(server, conversation=other["id"], input="Hi", max_output_tokens=1).usage
    release.set()
    reader.join(60)
    # The hung-up stream gave it back; nothing of the cut-short turn was appended.
    deadline = time.monotonic() + 30  # the server notices the hang-up at its next write
    while True:
        retry = httpx.post(f"{server.api}/responses", timeout=30, json={
            "model": "m", "conversation": conversation["id"], "input": "Me too.",
            "max_output_tokens": 1})
        if retry.status_code != 400 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert retry.status_code == 200, retry.text
    listed = items_of(server, conversation["id"], order="asc")
    assert texts(listed)[0] == ("user", "Me too.") and len(listed.data) == 2


@pytest.mark.parametrize(("method", "path", "body", "status", "param", "words"), [
    ("POST", "/responses", {"input": "x", "conversation": "conv_nope"}, 404, "conversation",
     "no conversation with id 'conv_nope'"),
    ("POST", "/responses", {"input": "x", "conversation": "conv_x",
                            "previous_response_id": "resp_x"}, 400, "conversation",
     "not with previous_response_id"),
    ("POST", "/conversations", {"items": [{"role": "user", "content": "x"}] * 21}, 400,
     "items", "at most 20 items"),
    ("POST", "/conversations", {"metadata": {"k": "v" * 513}}, 400, "metadata.k",
     "at most 512 characters"),
    ("POST", "/conversations", {"metadata": {f"k{i}": "v" for i in range(17)}}, 400,
     "metadata", "at most 16 items"),
    ("POST", "/conversations", {"items": [{"role": "user", "content": [
        {"type": "input_image"}]}]}, 400, "items.0.content.0",
     "exactly one of image_url and file_id"),
    ("GET", "/conversations/conv_nope", None, 404, "conversation_id", "no conversation"),
    ("DELETE", "/conversations/conv_nope", None, 404, "conversation_id", "no conversation"),
    ("GET", "/conversations/conv_nope/items", None, 404, "conversation_id", "no conversation"),
    ("POST", "/conversations/conv_nope/items", {"items": [{"role": "user", "content": "x"}]},
     404, "conversation_id", "no conversation"),
])
def test_bad_requests_are_named(server: RunningServer, method: str, path: str,
                                body: dict | None, status: int, param: str, words: str) -> None:
    answer = httpx.request(method, f"{server.api}{path}", json=body, timeout=30)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


def test_refusals_on_a_conversation(server: RunningServer) -> None:
    empty = httpx.post(f"{server.api}/conversations", json={}, timeout=30).json()
    nothing = httpx.post(f"{server.api}/responses", timeout=30,
                         json={"model": "m", "conversation": empty["id"]})
    assert nothing.status_code == 400 and nothing.json()["error"]["param"] == "input"
    assert create(server, conversation=empty["id"], input="Hi", max_output_tokens=1).usage
    conversation = httpx.post(f"{server.api}/conversations", json={
        "items": [{"role": "user", "content": "x"}]}, timeout=30).json()
    base = f"{server.api}/conversations/{conversation['id']}/items"
    call = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f",
            "arguments": "{}"}
    twice = httpx.post(base, json={"items": [call, call]}, timeout=30)
    assert twice.status_code == 400 and twice.json()["error"]["param"] == "items.1"
    assert httpx.post(base, json={"items": [call]}, timeout=30).status_code == 200
    again = httpx.post(base, json={"items": [call]}, timeout=30)
    assert again.json()["error"]["code"] == "duplicate_item", again.text
    resent = httpx.post(f"{server.api}/responses", timeout=30, json={
        "model": "m", "conversation": conversation["id"], "max_output_tokens": 1,
        "input": [call, {"type": "function_call_output", "call_id": "call_1",
                         "output": "{}"}]})
    assert resent.status_code == 400 and resent.json()["error"]["param"] == "input.0"
    cursor = httpx.get(base, params={"after": "msg_other"}, timeout=30)
    assert cursor.status_code == 400 and cursor.json()["error"]["code"] == "invalid_cursor"
    included = httpx.get(base, timeout=30, params={
        "include": ["message.input_image.image_url", "reasoning.summary"]})
    assert included.status_code == 400 and \
        included.json()["error"]["param"] == "query.include.1", included.text
    assert httpx.get(base, timeout=30, params={
        "include": ["message.input_image.image_url"]}).status_code == 200
    empty = httpx.post(base, json={"items": []}, timeout=30)
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "items"
