"""A stored response object is kept as the JSON it is answered with, encoded once when
stored, and a retrieve sends those bytes in slices (server.api.json_pages).

It used to be kept as a Python dict, JSON-encoded on the event loop for every
`GET /responses/{id}` (and, from Redis, the record's head decoded first, in a worker thread
but holding the GIL): a response with `top_logprobs: 20` on thousands of tokens is ~1.5 KB
of JSON a token, so a retrieve held every other client's stream for hundreds of ms. In
memory the dict also took several times the JSON bytes the store's bounds count.
"""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import RunningServer
from redis_server import RedisServer, server_on_store
from test_engine_stall import MAX_GAP_S
from test_stored_pages import watched

from server.api.json_pages import encoded
from server.api.response_store import RESPONSE_CODEC, StoredResponse, response_store
from server.api.stored_items import item_lines, stored_items
from server.config import load_settings
from server.demo_model import DemoModelPaths
from server.store import Codec, open_backend

HEAVY_TOKENS = 6000  # with 20 top logprobs each: ~9 MB of JSON, ~10 s on the demo model


@pytest.fixture(scope="module", params=["memory", "redis"])
def heavy_server(request: pytest.FixtureRequest, demo_model: DemoModelPaths,
                 tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[RunningServer, RedisServer | None]]:
    logs = tmp_path_factory.mktemp(f"response-bytes-{request.param}")
    env = {"VLSERVE_MAX_TOKENS_CAP": str(HEAVY_TOKENS), "VLSERVE_RESPONSES_STORE_MB": "512"}
    with server_on_store(request.param, demo_model, logs, "--n-parallel", "2",
                         "--n-ctx", str(HEAVY_TOKENS + 256), env=env) as started:
        yield started


@pytest.fixture(scope="module")
def heavy_response(heavy_server: tuple[RunningServer, RedisServer | None]) -> dict[str, Any]:
    """A stored response with 20 top logprobs on each of its HEAVY_TOKENS tokens."""
    server, _ = heavy_server
    answer = httpx.post(f"{server.api}/responses", timeout=600, json={
        "model": "m", "store": True, "temperature": 0, "input": "Go on.",
        "max_output_tokens": HEAVY_TOKENS, "top_logprobs": 20,
        "include": ["message.output_text.logprobs"]})
    assert answer.status_code == 200, answer.text
    made: dict[str, Any] = answer.json()
    assert made["usage"]["output_tokens"] == HEAVY_TOKENS, made["usage"]
    return made


def test_a_retrieve_of_a_response_with_heavy_logprobs_does_not_stall_other_streams(
        heavy_server: tuple[RunningServer, RedisServer | None],
        heavy_response: dict[str, Any], tmp_path: Path) -> None:
    server, _ = heavy_server
    gap, pages = watched(server, [f"/responses/{heavy_response['id']}"] * 3, tmp_path)
    for status, body in pages:
        assert status == 200
        assert len(body) > HEAVY_TOKENS * 1000  # what makes it heavy: the logprobs
        got = json.loads(body)
        assert got == heavy_response
        assert len(got["output"][0]["content"][0]["logprobs"]) == HEAVY_TOKENS
    assert gap < MAX_GAP_S, f"a stream stalled {gap * 1000:.0f} ms"


def test_a_heavy_response_takes_about_its_json_size_in_memory(
        heavy_response: dict[str, Any]) -> None:
    """What the memory store holds for it, against what the byte bounds count: the JSON
    (kept as a dict it took ~5x that)."""
    from server.api.response_store import stored_response

    text = json.dumps(heavy_response)
    gc.collect()
    tracemalloc.start()
    try:
        entry = stored_response(json.loads(text), "", [], [])  # the object dropped after
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"JSON {entry.size / 1e6:.1f} MB, held {held / 1e6:.1f} MB")
    assert entry.size > HEAVY_TOKENS * 1000
    assert held < 1.2 * entry.size, f"{held / entry.size:.1f}x the bytes counted"


# ---------- a record stored by the previous version (the object inside its head) ----------

def earlier_encode(entry: StoredResponse) -> tuple[bytes, bytes]:
    """How 1f96ff4 wrote a record: the response object inside the head's one JSON value."""
    assert entry.input_items is not None and entry.conversation is not None
    head = [entry.id, entry.owner, entry.response(), [i.id for i in entry.input_items],
            [i.id for i in entry.conversation], entry.size]
    return encoded(head), item_lines(entry.input_items + entry.conversation)


EARLIER_CODEC: Codec[StoredResponse] = Codec(earlier_encode, RESPONSE_CODEC.decode,
                                             heavy=True)
ITEM = {"id": "msg_in", "type": "message", "role": "user", "status": "completed",
        "content": [{"type": "input_text", "text": "Remember tulip."}]}
OUT = {"id": "msg_out", "type": "message", "role": "assistant", "status": "completed",
       "content": [{"type": "output_text", "text": "Tulip.", "annotations": []}]}


def earlier_record(response_id: str, status: str, *, background: bool) -> StoredResponse:
    from server.api.response_store import stored_response

    response = {"id": response_id, "object": "response", "created_at": 1, "model": "m",
                "status": status, "background": background, "error": None,
                "output": [OUT] if status == "completed" else [], "store": True}
    return stored_response(response, "", stored_items([ITEM]), stored_items([ITEM, OUT]))


# Redis only: the memory store's earlier records come back from a snapshot
# (tests/test_state_snapshot.py).
@pytest.mark.parametrize("heavy_server", ["redis"], indirect=True)
def test_a_response_stored_by_the_previous_version_in_redis_still_reads(
        heavy_server: tuple[RunningServer, RedisServer | None]) -> None:
    server, redis = heavy_server
    assert redis is not None
    done = earlier_record("resp_earlier1", "completed", background=False)
    running = earlier_record("resp_earlier2", "in_progress", background=True)

    async def put() -> None:
        backend = open_backend(redis.url(0))
        table = backend.table("responses", response_store(load_settings(None)).bounds,
                              EARLIER_CODEC)
        for entry in (done, running):
            await table.put("", entry.id, entry, entry.size)
        raw = await backend.table("responses", table.bounds, RESPONSE_CODEC).head(
            "", done.id)
        await backend.close()
        assert raw is not None and raw.response() == done.response()

    asyncio.run(put())
    api = server.api
    assert httpx.get(f"{api}/responses/{done.id}").json() == done.response()
    items = httpx.get(f"{api}/responses/{done.id}/input_items").json()
    assert [item["id"] for item in items["data"]] == ["msg_in"]
    follow = httpx.post(f"{api}/responses", timeout=60, json={
        "model": "m", "previous_response_id": done.id, "input": "Which flower?",
        "max_output_tokens": 2})
    assert follow.status_code == 200, follow.text
    refused = httpx.post(f"{api}/responses/{done.id}/cancel")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "not_background"
    # Running on a replica gone since: its state read from the old head, rewritten.
    still = httpx.post(f"{api}/responses", json={
        "model": "m", "previous_response_id": running.id, "input": "And?"})
    assert still.json()["error"]["code"] == "response_not_finished"
    cancelled = httpx.post(f"{api}/responses/{running.id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json() == {**running.response(), "status": "cancelled"}
    assert httpx.get(f"{api}/responses/{running.id}").json()["status"] == "cancelled"
