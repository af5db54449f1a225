"""Stored responses and conversation items cost the event loop little, whatever their size.

Their items (each turn's images as data URLs) used to be kept as Python objects and a page
of them JSON-encoded on the event loop; from Redis a response's whole record (its input
and its conversation, images twice) was one JSON value, decoded at once for any read.
Now each item is kept as the JSON it is listed as, encoded once when stored, one a line in
the record's body (a retrieve reads none of them), and a page is those bytes spliced and
sent in slices (server.api.json_pages), as stored chat pages are (test_stored_pages.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import RunningServer
from helpers import data_url
from redis_server import server_on_store
from test_engine_stall import MAX_GAP_S
from test_stored_chat import noise_png
from test_stored_pages import IMAGE_SIDE, IMAGES, watched

from server.api.conversation_store import (
    CONVERSATION_CODEC,
    json_size,
    new_conversation,
    without_item,
)
from server.api.response_store import RESPONSE_CODEC, stored_response
from server.api.stored_items import item_values, stored_items
from server.demo_model import DemoModelPaths


@pytest.fixture(scope="module", params=["memory", "redis"])
def items_server(request: pytest.FixtureRequest, demo_model: DemoModelPaths,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    logs = tmp_path_factory.mktemp(f"item-pages-{request.param}")
    env = {"VLSERVE_MAX_TOKENS_CAP": "3000", "VLSERVE_RESPONSES_STORE_MB": "512",
           "VLSERVE_CONVERSATIONS_STORE_MB": "512"}
    with server_on_store(request.param, demo_model, logs, "--n-parallel", "2",
                         "--n-ctx", "4096", env=env) as (running, _):
        yield running


def image_items(count: int = IMAGES) -> list[dict[str, Any]]:
    """One user message a picture: ~7.5 MB of data URL each."""
    return [{"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": f"Picture {i}."},
        {"type": "input_image", "image_url": data_url(noise_png(IMAGE_SIDE, i))}]}
        for i in range(count)]


@pytest.fixture(scope="module")
def image_response(items_server: RunningServer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A stored response whose input is the pictures (and the items sent)."""
    sent = image_items()
    answer = httpx.post(f"{items_server.api}/responses", timeout=300, json={
        "model": "m", "store": True, "temperature": 0, "max_output_tokens": 1,
        "input": sent})
    assert answer.status_code == 200, answer.text
    return answer.json(), sent


def test_a_page_of_large_input_items_does_not_stall_other_streams(
        items_server: RunningServer, image_response: tuple[dict[str, Any], list[Any]],
        tmp_path: Path) -> None:
    made, sent = image_response
    path = f"/responses/{made['id']}/input_items"
    gap, pages = watched(items_server, [f"{path}?limit=100&order=asc",
                                        f"{path}?limit=2"], tmp_path)
    (status, whole), (last_status, newest) = pages
    assert (status, last_status) == (200, 200)
    page = json.loads(whole)
    assert [item["content"][1]["image_url"] for item in page["data"]] == [
        item["content"][1]["image_url"] for item in sent]
    assert page["data"][0]["content"][0] == {"type": "input_text", "text": "Picture 0."}
    assert page["data"][0]["content"][1]["detail"] == "auto"
    ids = [item["id"] for item in page["data"]]
    assert (page["first_id"], page["last_id"], page["has_more"]) == (ids[0], ids[-1], False)
    two = json.loads(newest)
    assert [item["id"] for item in two["data"]] == ids[::-1][:2] and two["has_more"]
    assert gap < MAX_GAP_S, f"a stream stalled {gap * 1000:.0f} ms"


def test_a_retrieve_of_a_response_with_large_input_does_not_stall_other_streams(
        items_server: RunningServer, image_response: tuple[dict[str, Any], list[Any]],
        tmp_path: Path) -> None:
    made, _ = image_response
    gap, pages = watched(items_server, [f"/responses/{made['id']}"] * 3, tmp_path)
    for status, body in pages:
        assert status == 200
        got = json.loads(body)
        assert {k: v for k, v in got.items() if k != "store"} == {
            k: v for k, v in made.items() if k != "store"}
    assert gap < MAX_GAP_S, f"a stream stalled {gap * 1000:.0f} ms"


def test_a_page_of_large_conversation_items_does_not_stall_other_streams(
        items_server: RunningServer, tmp_path: Path) -> None:
    sent = image_items(2 * IMAGES)  # nothing decodes them: twice a response's, ~75 MB
    made = httpx.post(f"{items_server.api}/conversations", timeout=300,
                      json={"items": sent[:IMAGES]})  # a body is at most 50 MB
    assert made.status_code == 200, made.text
    added = httpx.post(f"{items_server.api}/conversations/{made.json()['id']}/items",
                       timeout=300, json={"items": sent[IMAGES:]})
    assert added.status_code == 200, added.text
    assert [item["content"][0]["text"] for item in added.json()["data"]] == [
        f"Picture {i}." for i in range(IMAGES, 2 * IMAGES)]
    path = f"/conversations/{made.json()['id']}/items"
    gap, pages = watched(items_server, [f"{path}?limit=100&order=asc", f"{path}?limit=2"],
                         tmp_path)
    (status, whole), (last_status, newest) = pages
    assert (status, last_status) == (200, 200)
    page = json.loads(whole)
    assert [item["content"] for item in page["data"]] == [
        [part, {**image, "detail": "auto"}] for part, image in
        (item["content"] for item in sent)]
    ids = [item["id"] for item in page["data"]]
    assert (page["first_id"], page["last_id"], page["has_more"]) == (ids[0], ids[-1], False)
    two = json.loads(newest)
    assert [item["id"] for item in two["data"]] == ids[::-1][:2] and two["has_more"]
    one = httpx.get(f"{items_server.api}/conversations/{made.json()['id']}/items/{ids[2]}",
                    timeout=60)
    assert one.json() == page["data"][2]
    assert gap < MAX_GAP_S, f"a stream stalled {gap * 1000:.0f} ms"


# ---------- records (no server) ----------

ITEM = {"id": "msg_1", "type": "message", "role": "user", "status": "completed",
        "content": [{"type": "input_text", "text": "é\n\ud800"}]}
OUT = {"id": "msg_2", "type": "message", "role": "assistant", "status": "completed",
       "content": [{"type": "output_text", "text": "ok", "annotations": []}]}


def test_a_stored_response_reads_back_as_stored_in_either_format() -> None:
    response = {"id": "resp_1", "status": "completed", "output": [OUT]}
    entry = stored_response(response, "alice", stored_items([ITEM]), stored_items([ITEM, OUT]))
    earlier = json.dumps(["resp_1", "alice", response, [ITEM], [ITEM, OUT], 123],
                         separators=(",", ":")).encode()  # the previous version's: one value
    for head, body in (RESPONSE_CODEC.encode(entry), (earlier, b"")):
        back = RESPONSE_CODEC.decode(head, body)
        assert (back.id, back.owner, back.response()) == ("resp_1", "alice", response)
        assert (back.status, back.background) == ("completed", False)
        assert back.input_items is not None and back.conversation is not None
        assert item_values(back.input_items) == [ITEM]
        assert item_values(back.conversation) == [ITEM, OUT]
        assert [item.id for item in back.conversation] == ["msg_1", "msg_2"]
        without = RESPONSE_CODEC.decode(head, None)  # a retrieve: no items read
        assert without.response() == response
    assert RESPONSE_CODEC.decode(RESPONSE_CODEC.encode(entry)[0], None).input_items is None


def test_a_stored_conversation_reads_back_as_stored_in_either_format() -> None:
    made = new_conversation("alice", {"k": "v"}, stored_items([ITEM, OUT]))
    earlier = json.dumps([made.id, "alice", made.created_at, {"k": "v"}, [ITEM, OUT],
                          made.size], separators=(",", ":")).encode()
    for head, body in (CONVERSATION_CODEC.encode(made), (earlier, b"")):
        back = CONVERSATION_CODEC.decode(head, body)
        assert (back.id, back.owner, back.created_at, back.metadata, back.size) == (
            made.id, "alice", made.created_at, {"k": "v"}, made.size)
        assert item_values(back.items) == [ITEM, OUT]
        assert [item.id for item in back.items] == ["msg_1", "msg_2"]
    empty = new_conversation("alice", {}, [])
    assert CONVERSATION_CODEC.decode(*CONVERSATION_CODEC.encode(empty)).items == []


def test_an_earlier_conversations_size_is_counted_as_its_items_are_now() -> None:
    """The previous version counted non-ASCII text escaped (6 bytes a character): read back
    with that size, deleting its items left bytes no item holds, counted against the key's
    share for good. A record whose body was lost counts nothing but its metadata."""
    item = {**ITEM, "content": [{"type": "input_text", "text": "日本語の文章" * 50}]}
    escaped = len(json.dumps(item, separators=(",", ":")))  # ensure_ascii, as it was
    earlier = json.dumps(["conv_1", "alice", 1, {}, [item], 2 + escaped],
                         separators=(",", ":")).encode()
    back = CONVERSATION_CODEC.decode(earlier, b"")
    assert without_item(back, item["id"]).size == json_size({})
    made = new_conversation("alice", {"k": "v"}, stored_items([ITEM, OUT]))
    lost = CONVERSATION_CODEC.decode(CONVERSATION_CODEC.encode(made)[0], None)
    assert (lost.items, lost.size) == ([], json_size({"k": "v"}))
