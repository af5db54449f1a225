"""Pure logic of the Responses API: the response store's bounds, owners and TTL (a fake
clock), and a stream that fails midway ending in a response.failed that the SDK's types
accept (a fake event source: the engine cannot be made to fail on cue)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from helpers import RESPONSE_EVENT
from openai.types.responses import Response

from server.api.response_store import ResponseStore, StoredResponse, stored_response
from server.api.responses_output import Finished, ResponseDraft, stream_events
from server.engine import ErrorEvent, TokenEvent


def entry(response_id: str, owner: str = "", pad: int = 0) -> StoredResponse:
    return stored_response({"id": response_id, "pad": "x" * pad}, owner, [], [])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_owner_sees_only_its_own() -> None:
    store = ResponseStore(10, 1 << 20, 60)
    assert store.add(entry("resp_a", owner="alice"))
    assert store.get("resp_a", "alice") is not None
    assert store.get("resp_a", "bob") is None
    assert not store.delete("resp_a", "bob")
    assert store.delete("resp_a", "alice") and store.get("resp_a", "alice") is None
    assert store.usage() == (0, 0)


def test_an_owner_over_its_share_loses_its_own_oldest() -> None:
    store = ResponseStore(4, 1 << 20, 60, max_count_per_owner=2)
    for name in ("a1", "a2", "a3"):
        store.add(entry(name, owner="a"))
    store.add(entry("b1", owner="b"))
    assert store.get("a1", "a") is None  # a's oldest, not b's
    assert store.get("a2", "a") and store.get("a3", "a") and store.get("b1", "b")


def test_bytes_are_bounded_and_too_big_is_not_kept() -> None:
    size = entry("r0", pad=1000).size
    store = ResponseStore(100, 3 * size, 60)
    for i in range(5):
        assert store.add(entry(f"r{i}", pad=1000))
    assert store.usage() == (3, 3 * size)
    assert store.get("r1", "") is None and store.get("r4", "") is not None
    assert not store.add(entry("huge", pad=10_000))
    assert store.get("huge", "") is None and store.usage() == (3, 3 * size)


def test_responses_expire_after_the_ttl() -> None:
    clock = Clock()
    store = ResponseStore(10, 1 << 20, 60, clock=clock)
    store.add(entry("old"))
    clock.now += 30
    store.add(entry("new"))
    clock.now += 31
    assert store.get("old", "") is None and store.get("new", "") is not None
    clock.now += 30
    assert store.get("new", "") is None and store.usage() == (0, 0)


def test_a_failure_midway_is_a_response_failed_event() -> None:
    async def failing() -> AsyncIterator[TokenEvent | ErrorEvent]:
        yield TokenEvent(" world")
        yield ErrorEvent(500, "the engine failed on this request", "engine_error")

    ends: list[Finished] = []

    async def record(end: Finished) -> None:
        ends.append(end)
    draft = ResponseDraft("resp_x", "demo", {
        "instructions": None, "max_output_tokens": None, "temperature": 0.8, "top_p": 0.95,
        "tools": [], "tool_choice": "auto", "parallel_tool_calls": True,
        "text": {"format": {"type": "text"}}, "store": True, "previous_response_id": None,
        "metadata": None})

    async def run() -> list[str]:
        events = failing()
        first = await anext(events)
        return [line async for line in stream_events(draft, first, events, record)]

    events = [json.loads(line.split("data: ", 1)[1]) for line in asyncio.run(run())]
    for event in events:
        RESPONSE_EVENT.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    last = events[-1]
    assert last["type"] == "response.failed"
    failed = Response.model_validate(last["response"])
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.code == "server_error"
    assert failed.error.message == "the engine failed on this request"
    assert ends[0].body is None and ends[0].error_status == 500  # not stored, logged as 500
    # What was written before the failure stays in the output, closed as cut short.
    assert failed.output_text == " world" and failed.output[0].status == "incomplete"
    assert [e["type"] for e in events[-4:-1]] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done"]
