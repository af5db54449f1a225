"""Stored chat completions (`store: true` on POST /chat/completions) end to end on the LLaVA
demo model, with the openai SDK's `chat.completions.retrieve/update/list/delete` and
`.messages.list`, every answer validated by the SDK's own types: a completion (streamed or
not, every choice) reads back as it was answered, with its metadata and its request's
messages; listings page, order and filter; metadata is replaced; a deleted, unstored or
another key's completion is a 404; bad metadata is a 400 naming it; a key over its share
loses its own oldest (count and bytes). Each server test runs on both backends: this
process's memory and a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import uuid
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import numpy as np
import openai
import pytest
from conftest import RunningServer
from helpers import data_url, image_message, photo_bytes
from openai.pagination import SyncCursorPage
from openai.types.chat import ChatCompletion, ChatCompletionDeleted, ChatCompletionStoreMessage
from PIL import Image
from redis_server import RedisServer, server_on_store

from server.api.chat_keep import StreamAssembly
from server.api.chat_store import ChatStore, chat_store_bounds, stored_chat
from server.api.protocol import ChatMessageIn
from server.config import load_settings
from server.demo_model import DemoModelPaths
from server.store import Bounds
from server.store.memory import MemoryTable
from server.store.table import AsyncMemoryTable
from server.timings import StageTimer

# A: most tests; B: another key; C: the count bound; D: the byte bound.
KEY_A, KEY_B, KEY_C, KEY_D = (f"sk-stored-chat-{name}" for name in "abcd")
PER_KEY = 8  # chat_completions_max_stored 32 over 4 keys
PER_KEY_BYTES = 1024 * 1024 // 4  # chat_completions_store_mb 1 over 4 keys


class StoreMessage(ChatCompletionStoreMessage):
    """The SDK's type but for `role`: its OpenAPI spec derives the type from an answer's
    message ("assistant" only), while OpenAI lists the request's messages with their own."""

    role: Literal["system", "developer", "user", "assistant", "tool",  # type: ignore[assignment]
                  "function"]


COMPLETIONS = SyncCursorPage[ChatCompletion]
MESSAGES = SyncCursorPage[StoreMessage]
REDIS: dict[str, RedisServer] = {}  # the Redis of the server at that url (when it has one)


@pytest.fixture(scope="module", params=["memory", "redis"])
def stored(request: pytest.FixtureRequest, demo_model: DemoModelPaths,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server with four keys sharing a small store, on either backend."""
    logs = tmp_path_factory.mktemp(f"stored-chat-{request.param}")
    env = {"VLSERVE_API_KEYS": ",".join((KEY_A, KEY_B, KEY_C, KEY_D)),
           "VLSERVE_CHAT_COMPLETIONS_MAX_STORED": str(PER_KEY * 4),
           "VLSERVE_CHAT_COMPLETIONS_STORE_MB": "1"}
    with server_on_store(request.param, demo_model, logs, "--n-parallel", "2",
                         env=env) as (running, redis):
        if redis is not None:
            REDIS[running.url] = redis
        yield running


def sdk(server: RunningServer, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key=key, max_retries=0, timeout=120)


def call(server: RunningServer, method: str, path: str, key: str = KEY_A,
         **kwargs: Any) -> httpx.Response:
    """One raw request under /api/v1 (the JSON exactly as the server sent it)."""
    return httpx.request(method, f"{server.api}{path}", timeout=120,
                         headers={"Authorization": f"Bearer {key}"}, **kwargs)


def create(server: RunningServer, key: str = KEY_A, **body: Any) -> dict[str, Any]:
    """POST /chat/completions; the answer's raw JSON, checked by the SDK's type."""
    body = {"model": "m", "max_tokens": 3,
            "messages": [{"role": "user", "content": "Hello."}], **body}
    answer = call(server, "POST", "/chat/completions", key, json=body)
    assert answer.status_code == 200, answer.text
    ChatCompletion.model_validate(answer.json())
    return answer.json()


def retrieved(server: RunningServer, completion_id: str, key: str = KEY_A) -> dict[str, Any]:
    answer = call(server, "GET", f"/chat/completions/{completion_id}", key)
    assert answer.status_code == 200, answer.text
    assert ChatCompletion.model_validate(answer.json()).id == completion_id
    return answer.json()


def listed(server: RunningServer, key: str = KEY_A, **params: Any) -> COMPLETIONS:
    answer = call(server, "GET", "/chat/completions", key, params=params)
    assert answer.status_code == 200, answer.text
    assert answer.json()["object"] == "list"
    return COMPLETIONS.model_validate(answer.json())


def ids(page: COMPLETIONS | MESSAGES) -> list[str]:
    return [item.id for item in page.data]


def assert_404(answer: httpx.Response) -> None:
    assert answer.status_code == 404, answer.text
    error = answer.json()["error"]
    assert error["type"] == "not_found_error" and error["param"] == "completion_id"
    assert error["code"] == "chat_completion_not_found"


def gone(server: RunningServer, completion_id: str, key: str = KEY_A) -> bool:
    """Whether every route answers 404 for `completion_id` under `key`."""
    path = f"/chat/completions/{completion_id}"
    answers = [call(server, "GET", path, key), call(server, "GET", f"{path}/messages", key),
               call(server, "POST", path, key, json={"metadata": {"x": "y"}})]
    if answers[0].status_code != 404:
        return False
    for answer in answers:
        assert_404(answer)
    return True


def noise_png(side: int, seed: int) -> bytes:
    """An incompressible picture: its PNG (and data URL) is as large as its pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


# ---------- stored, read back ----------

def test_a_stored_completion_reads_back_as_answered(stored: RunningServer) -> None:
    image = data_url(photo_bytes(32, 24))
    messages = [{"role": "system", "content": "Be brief."},
                image_message("What is it?", image),
                {"role": "assistant", "content": "A picture."},
                {"role": "user", "content": "Say more.", "name": "ann"}]
    answered = create(stored, messages=messages, store=True, metadata={"topic": "pics"},
                      logprobs=True, top_logprobs=2)
    completion_id = answered["id"]
    back = retrieved(stored, completion_id)
    assert back == {**answered, "metadata": {"topic": "pics"}}
    via_sdk = sdk(stored).chat.completions.retrieve(completion_id)
    assert via_sdk == ChatCompletion.model_validate(back)
    assert via_sdk.metadata == {"topic": "pics"} and via_sdk.choices[0].logprobs is not None
    if stored.url in REDIS:  # in Redis: the listing's head apart from the messages' body
        redis = REDIS[stored.url]
        assert redis.command("HEXISTS", "vlserve:chat_completions:head", completion_id) == ":1"
        assert redis.command("EXISTS", f"vlserve:chat_completions:body:{completion_id}") == ":1"

    page = call(stored, "GET", f"/chat/completions/{completion_id}/messages")
    assert page.status_code == 200, page.text
    listed_messages = MESSAGES.model_validate(page.json())
    assert ids(listed_messages) == [f"{completion_id}-{i}" for i in range(4)]
    assert not listed_messages.has_more
    system, user, assistant, named = page.json()["data"]
    assert system == {"id": f"{completion_id}-0", "role": "system", "content": "Be brief.",
                      "name": None, "content_parts": None}
    assert user["content"] == "What is it?" and user["content_parts"] == messages[1]["content"]
    assert (assistant["role"], assistant["content"]) == ("assistant", "A picture.")
    assert (named["name"], named["content"]) == ("ann", "Say more.")


def test_messages_are_listed_in_pages(stored: RunningServer) -> None:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i}."}
                for i in range(5)]
    completion_id = create(stored, messages=messages, store=True)["id"]
    client = sdk(stored)
    every = list(client.chat.completions.messages.list(completion_id, limit=2))  # 3 pages
    assert [m.id for m in every] == [f"{completion_id}-{i}" for i in range(5)]
    assert [m.content for m in every] == [f"Turn {i}." for i in range(5)]
    first = client.chat.completions.messages.list(completion_id, limit=2, order="desc")
    assert ids(first) == [f"{completion_id}-4", f"{completion_id}-3"] and first.has_more
    raw = call(stored, "GET", f"/chat/completions/{completion_id}/messages",
               params={"limit": 2, "order": "desc", "after": f"{completion_id}-3"}).json()
    assert MESSAGES.model_validate(raw).has_more
    assert (raw["first_id"], raw["last_id"]) == (f"{completion_id}-2", f"{completion_id}-1")
    unknown = call(stored, "GET", f"/chat/completions/{completion_id}/messages",
                   params={"after": "nope"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "after"


def test_a_stream_is_stored_whole_with_every_choice(stored: RunningServer) -> None:
    client = sdk(stored)
    for include_usage in (False, True):
        texts: dict[int, str] = {}
        finish: dict[int, str | None] = {}
        usage = None
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Count."}], max_tokens=6,
            n=2, stream=True, store=True, metadata={"streamed": str(include_usage)},
            stream_options={"include_usage": include_usage})
        for chunk in stream:
            completion_id = chunk.id
            usage = chunk.usage or usage
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
                finish[choice.index] = choice.finish_reason or finish.get(choice.index)
        back = client.chat.completions.retrieve(completion_id)
        assert back.metadata == {"streamed": str(include_usage)}
        assert [c.index for c in back.choices] == [0, 1]
        assert {c.index: c.message.content for c in back.choices} == texts
        assert {c.index: c.finish_reason for c in back.choices} == finish
        assert back.usage is not None and back.usage.completion_tokens > 0
        if include_usage:
            assert back.usage == usage
        raw = retrieved(stored, completion_id)
        assert raw["object"] == "chat.completion" and raw["timings"]


def test_a_stored_answer_keeps_its_service_tier_streamed_or_not(stored: RunningServer
                                                                ) -> None:
    client = sdk(stored)
    asked = {"model": "m", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2,
             "store": True, "service_tier": "priority"}
    whole = client.chat.completions.create(**asked)
    chunks = list(client.chat.completions.create(**asked, stream=True))
    for completion_id in (whole.id, chunks[0].id):
        raw = retrieved(stored, completion_id)
        assert raw["service_tier"] == "default", raw


# ---------- listed, changed, deleted ----------

def test_listing_orders_pages_and_filters(stored: RunningServer) -> None:
    run = uuid.uuid4().hex
    made = [create(stored, store=True, max_tokens=1,
                   metadata={"run": run, "kind": "odd" if i % 2 else "even"})["id"]
            for i in range(4)]
    client = sdk(stored)
    assert [c.id for c in client.chat.completions.list(metadata={"run": run}, limit=3)] == made
    first = listed(stored, **{"metadata[run]": run, "limit": 3})
    assert ids(first) == made[:3] and first.has_more
    assert (first.first_id, first.last_id) == (made[0], made[2])  # type: ignore[attr-defined]
    rest = listed(stored, **{"metadata[run]": run, "limit": 3, "after": made[2]})
    assert ids(rest) == made[3:] and not rest.has_more
    newest = client.chat.completions.list(metadata={"run": run}, order="desc", limit=2)
    assert ids(newest) == [made[3], made[2]] and newest.has_more
    odd = client.chat.completions.list(metadata={"run": run, "kind": "odd"})
    assert ids(odd) == [made[1], made[3]] and not odd.has_more
    assert all(c.metadata == {"run": run, "kind": "odd"} for c in odd.data)
    assert ids(client.chat.completions.list(metadata={"run": run},
                                            model=stored.model_name)) == made
    assert ids(client.chat.completions.list(metadata={"run": run}, model="other")) == []
    whole = listed(stored, limit=100)
    assert [c for c in whole.data if c.id in made] == [
        ChatCompletion.model_validate(retrieved(stored, i)) for i in made]
    bad = call(stored, "GET", "/chat/completions", params={"limit": 101})
    assert bad.status_code == 400 and bad.json()["error"]["param"].endswith("limit")
    for params in ({"metadata[a][b]": "v"}, {"metadata": "v"}, {"metadata[]": "v"},
                   {f"metadata[k{i}]": "v" for i in range(17)}):
        refused = call(stored, "GET", "/chat/completions", params=params)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "metadata"


def test_a_cursor_keeps_its_place_through_updates_and_deletes(stored: RunningServer) -> None:
    """Completions made within one second: an update (which stores one anew) moves none of
    them, and a cursor naming one deleted since goes on from where it was."""
    run = uuid.uuid4().hex
    made = [create(stored, store=True, max_tokens=1, metadata={"run": run})["id"]
            for _ in range(3)]
    client = sdk(stored)
    first = client.chat.completions.list(metadata={"run": run}, limit=1)
    assert ids(first) == made[:1]
    client.chat.completions.update(made[0], metadata={"run": run, "seen": "yes"})
    assert ids(listed(stored, **{"metadata[run]": run, "after": made[0]})) == made[1:]
    client.chat.completions.delete(made[1])
    assert ids(listed(stored, **{"metadata[run]": run, "after": made[1]})) == made[2:]
    newest_first = listed(stored, **{"metadata[run]": run, "after": made[1], "order": "desc"})
    assert ids(newest_first) == made[:1]


def test_an_update_replaces_the_metadata(stored: RunningServer) -> None:
    run = uuid.uuid4().hex
    answered = create(stored, store=True, metadata={"run": run, "stage": "draft"})
    client = sdk(stored)
    updated = client.chat.completions.update(answered["id"], metadata={"stage": "final"})
    assert updated.metadata == {"stage": "final"}
    assert retrieved(stored, answered["id"]) == {**answered, "metadata": {"stage": "final"}}
    assert ids(client.chat.completions.list(metadata={"run": run})) == []
    assert ids(client.chat.completions.list(metadata={"stage": "final"}))[-1] == answered["id"]
    cleared = call(stored, "POST", f"/chat/completions/{answered['id']}",
                   json={"metadata": None})
    assert cleared.status_code == 200
    assert ChatCompletion.model_validate(cleared.json()).metadata == {}
    missing = call(stored, "POST", f"/chat/completions/{answered['id']}", json={})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "metadata"


def test_a_deleted_completion_is_gone(stored: RunningServer) -> None:
    completion_id = create(stored, store=True)["id"]
    answer = call(stored, "DELETE", f"/chat/completions/{completion_id}")
    assert answer.status_code == 200
    deleted = ChatCompletionDeleted.model_validate(answer.json())
    assert (deleted.id, deleted.deleted, deleted.object) == (
        completion_id, True, "chat.completion.deleted")
    assert gone(stored, completion_id)
    assert_404(call(stored, "DELETE", f"/chat/completions/{completion_id}"))
    with pytest.raises(openai.NotFoundError):
        sdk(stored).chat.completions.delete(completion_id)
    assert completion_id not in ids(listed(stored, limit=100))


def test_another_keys_completion_is_a_404(stored: RunningServer) -> None:
    completion_id = create(stored, store=True, metadata={"owner": "a"})["id"]
    assert gone(stored, completion_id, key=KEY_B)
    assert_404(call(stored, "DELETE", f"/chat/completions/{completion_id}", KEY_B))
    assert completion_id not in ids(listed(stored, KEY_B, limit=100))
    assert ids(listed(stored, KEY_B, **{"metadata[owner]": "a"})) == []
    assert retrieved(stored, completion_id)["metadata"] == {"owner": "a"}  # untouched
    unauthenticated = httpx.get(f"{stored.api}/chat/completions/{completion_id}", timeout=30)
    assert unauthenticated.status_code == 401


def test_without_store_nothing_is_kept(stored: RunningServer) -> None:
    unstored = [create(stored, KEY_B)["id"], create(stored, KEY_B, store=False)["id"],
                create(stored, KEY_B, store=None, metadata={"k": "v"})["id"]]
    chunks = sdk(stored, KEY_B).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi."}], max_tokens=2, stream=True)
    (streamed,) = {chunk.id for chunk in chunks}  # read to its end
    unstored.append(streamed)
    for completion_id in unstored:
        assert gone(stored, completion_id, key=KEY_B)
    assert not set(unstored) & set(ids(listed(stored, KEY_B, limit=100)))


@pytest.mark.parametrize("metadata, param", [
    ({f"k{i}": "v" for i in range(17)}, "metadata"),
    ({"k": "v" * 513}, "metadata.k"),
    ({"k" * 65: "v"}, "metadata." + "k" * 65),
    ({"k": 1}, "metadata.k"),
    ([["k", "v"]], "metadata"),
])
def test_bad_metadata_is_a_400_naming_it(stored: RunningServer, metadata: object,
                                         param: str) -> None:
    run = uuid.uuid4().hex
    answer = call(stored, "POST", "/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": run}], "store": True,
        "metadata": metadata})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].startswith(param)
    completion_id = create(stored, store=True)["id"]
    update = call(stored, "POST", f"/chat/completions/{completion_id}",
                  json={"metadata": metadata})
    assert update.status_code == 400 and update.json()["error"]["param"].startswith(param)
    assert retrieved(stored, completion_id)["metadata"] == {}


# ---------- bounds ----------

def test_a_key_over_its_count_share_loses_its_own_oldest(stored: RunningServer) -> None:
    others = create(stored, KEY_A, store=True)["id"]
    made = [create(stored, KEY_C, store=True, max_tokens=1)["id"] for _ in range(PER_KEY + 2)]
    assert ids(listed(stored, KEY_C, limit=100)) == made[2:]
    assert gone(stored, made[0], KEY_C) and gone(stored, made[1], KEY_C)
    assert retrieved(stored, others)["id"] == others  # another key's is never pushed out


def test_a_key_over_its_byte_share_loses_its_own_oldest(stored: RunningServer) -> None:
    # Two of these (~200 KB as data URLs) are over the key's 256 KiB; one is not.
    first, second = (create(stored, KEY_D, store=True, max_tokens=1, messages=[
        image_message("What is it?", data_url(noise_png(220, seed)))])["id"]
        for seed in (1, 2))
    assert gone(stored, first, KEY_D)
    assert ids(listed(stored, KEY_D, limit=100)) == [second]
    # Alone over the whole share: answered, not kept (and nothing else pushed out for it).
    huge = create(stored, KEY_D, store=True, max_tokens=1, messages=[
        image_message("And this?", data_url(noise_png(330, 3)))])
    assert huge["choices"] and gone(stored, huge["id"], KEY_D)
    assert ids(listed(stored, KEY_D, limit=100)) == [second]
    assert "over the per-key byte share" in stored.log()


# ---------- the store itself (no server) ----------

def test_the_settings_bound_the_store() -> None:
    settings = load_settings(None, api_keys=["a", "b"], chat_completions_max_stored=10,
                             chat_completions_store_mb=2, chat_completions_ttl_s=5)
    assert chat_store_bounds(settings) == Bounds(10, 2 << 20, 5, 5, 1 << 20, lru=False,
                                                 evict_others=True)


def test_stored_completions_expire_after_the_ttl() -> None:
    now = [1000.0]
    bounds = Bounds(10, 1 << 20, 60, 10, 1 << 20, evict_others=True)
    store = ChatStore(AsyncMemoryTable(MemoryTable(bounds, lambda: now[0])), bounds,
                      lambda name: contextlib.nullcontext())
    messages = [ChatMessageIn(role="user", content="Hi.")]

    def entry(completion_id: str) -> Any:
        return stored_chat({"id": completion_id, "created": int(now[0]), "model": "m"},
                           "alice", {}, messages)

    async def scenario() -> None:
        assert await store.add(entry("chatcmpl-old"))
        now[0] += 30
        assert await store.add(entry("chatcmpl-new"))
        now[0] += 31
        assert await store.get("chatcmpl-old", "alice") is None
        assert [e.id for e in await store.listed("alice")] == ["chatcmpl-new"]
        assert await store.get("chatcmpl-new", "bob") is None
    asyncio.run(scenario())
    assert [json.loads(m) for m in entry("x").messages] == [
        {"id": "x-0", "role": "user", "content": "Hi.", "name": None, "content_parts": None}]


def test_a_streams_chunks_add_up_to_its_completion() -> None:
    """Tool-call pieces, a deprecated function_call's, reasoning and logprobs, two choices
    interleaved: put together as the non-streaming answer would have them."""
    head = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 7, "model": "m"}

    def line(index: int, delta: dict[str, Any], finish: str | None = None,
             logprobs: dict[str, Any] | None = None) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    token = {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}
    lines = [line(0, {"role": "assistant", "content": ""}),
             line(1, {"role": "assistant", "content": ""}),
             line(0, {"reasoning_content": "Think."}),
             line(0, {"content": "Hi"}, logprobs={"content": [token]}),
             line(1, {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                      "function": {"name": "f", "arguments": ""}}]}),
             line(1, {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
             line(0, {"content": "!"}, logprobs={"content": [token]}),
             line(1, {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
             line(0, {}, "stop"), line(1, {}, "tool_calls"),
             f"data: {json.dumps({**head, 'choices': [], 'usage': {'total_tokens': 9}})}\n\n"]
    assembly = StreamAssembly(logprobs=True)
    for each in lines:
        assembly.add(each)
    assembly.add('data: {"error": {"message": "m", "type": "server_error", "param": null, '
                 '"code": null}}\n\n')  # what a failure midway sends: passed over
    whole = assembly.completion(StageTimer())
    assert whole["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hi!",
                                 "reasoning_content": "Think."},
         "finish_reason": "stop", "logprobs": {"content": [token, token]}},
        {"index": 1, "message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f",
                                                             "arguments": '{"a":1}'}}]},
         "finish_reason": "tool_calls", "logprobs": {"content": []}}]
    assert whole["usage"] == {"total_tokens": 9} and whole["object"] == "chat.completion"

    legacy = StreamAssembly(logprobs=False)
    for delta in ({"role": "assistant", "content": ""},
                  {"function_call": {"name": "f", "arguments": ""}},
                  {"function_call": {"arguments": "{}"}}):
        legacy.add(line(0, delta))
    legacy.add(line(0, {}, "function_call"))
    done = ChatCompletion.model_validate(legacy.completion(StageTimer()))
    assert done.choices[0].message.function_call is not None
    assert (done.choices[0].message.function_call.name,
            done.choices[0].message.function_call.arguments) == ("f", "{}")
    assert done.choices[0].message.content is None and done.usage is not None
