"""Background responses (`background: true`) on the LLaVA demo model, every object and event
validated by the openai SDK's types: answered at once ("queued"), read back until done,
streamed now or later from any event on, cancelled, not stopped by a client that leaves,
and on a conversation."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import LONG_TOKENS as LONG
from conftest import RunningServer
from helpers import RESPONSE_EVENT, metric_value
from openai.types.responses import Response
from test_request_log import request_lines

TERMINAL = ("completed", "incomplete", "failed", "cancelled")


def post(server: RunningServer, **body: object) -> Response:
    answer = httpx.post(f"{server.api}/responses", json={"model": "m", **body}, timeout=60)
    assert answer.status_code == 200, answer.text
    return Response.model_validate(answer.json())


def get(server: RunningServer, response_id: str) -> Response:
    answer = httpx.get(f"{server.api}/responses/{response_id}", timeout=60)
    assert answer.status_code == 200, answer.text
    return Response.model_validate(answer.json())


def until_done(server: RunningServer, response_id: str, timeout: float = 120) -> Response:
    deadline = time.monotonic() + timeout
    while True:
        reply = get(server, response_id)
        if reply.status in TERMINAL:
            return reply
        assert time.monotonic() < deadline, reply.status
        time.sleep(0.05)


def events_of(answer: httpx.Response) -> Iterator[dict]:
    """The SSE events of a streamed answer, each validated by the SDK's event union."""
    assert answer.status_code == 200
    for line in answer.iter_lines():
        if line.startswith("data: "):
            event = json.loads(line[6:])
            RESPONSE_EVENT.validate_python(event)
            yield event


def test_queued_at_once_then_read_back_done(server: RunningServer) -> None:
    queued = post(server, input="Say something.", max_output_tokens=5, temperature=0,
                  background=True)
    assert queued.status == "queued" and queued.background is True
    assert queued.output == [] and queued.usage is None
    done = until_done(server, queued.id)
    assert done.status == "incomplete" and done.background is True
    assert done.usage is not None and done.usage.output_tokens == 5
    # The same answer as in the foreground (greedy).
    foreground = post(server, input="Say something.", max_output_tokens=5, temperature=0)
    assert done.output_text == foreground.output_text and foreground.background is False
    client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0)
    assert client.responses.retrieve(queued.id).output_text == done.output_text


def test_a_background_stream_is_replayed_from_any_event(server: RunningServer) -> None:
    body = {"model": "m", "input": "Say something.", "max_output_tokens": 5, "temperature": 0,
            "background": True, "stream": True}
    with httpx.stream("POST", f"{server.api}/responses", json=body, timeout=60) as answer:
        events = list(events_of(answer))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    # As OpenAI's: created and queued while it waits for the engine, then in_progress.
    assert [(e["type"], e["response"]["status"]) for e in events[:3]] == [
        ("response.created", "queued"), ("response.queued", "queued"),
        ("response.in_progress", "in_progress")]
    assert events[-1]["type"] == "response.incomplete"
    response_id = events[0]["response"]["id"]
    stored = httpx.get(f"{server.api}/responses/{response_id}", timeout=60).json()
    assert stored == events[-1]["response"] and stored["background"] is True
    for after in (None, 3, len(events) - 2):
        params = {"stream": "true"} | ({} if after is None else {"starting_after": after})
        with httpx.stream("GET", f"{server.api}/responses/{response_id}", params=params,
                          timeout=60) as again:
            replayed = list(events_of(again))
        assert replayed == events[0 if after is None else after + 1:]
    client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0)
    with client.responses.retrieve(response_id, stream=True, starting_after=3) as sdk_stream:
        assert [e.sequence_number for e in sdk_stream] == list(range(4, len(events)))


def test_a_client_that_leaves_does_not_stop_it_and_cancel_does(
        long_server: RunningServer) -> None:
    server = long_server
    body = {"model": "m", "input": "Go on.", "max_output_tokens": LONG, "temperature": 0,
            "background": True, "stream": True}
    with httpx.stream("POST", f"{server.api}/responses", json=body, timeout=60) as answer:
        first = next(events_of(answer))  # then hang up
    response_id = first["response"]["id"]
    done = until_done(server, response_id)
    assert done.status == "incomplete" and done.usage is not None
    assert done.usage.output_tokens == LONG  # ran to the end without its client

    running = post(server, input="Go on.", max_output_tokens=LONG, temperature=0,
                   background=True)
    # Generated token by token (not held to the end): its state says so while it runs.
    deadline = time.monotonic() + 60
    while get(server, running.id).status == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # Nothing continues from a response still being written.
    early = httpx.post(f"{server.api}/responses", timeout=60, json={
        "model": "m", "input": "And?", "previous_response_id": running.id})
    assert early.status_code == 400 and early.json()["error"]["code"] == "response_not_finished"
    time.sleep(0.1)  # some of the answer written
    client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0)
    reply = client.responses.cancel(running.id)
    assert reply.status == "cancelled" and reply.error is None
    assert reply.output and reply.output[0].status == "incomplete"  # what it had written
    assert reply.output_text
    assert get(server, running.id).status == "cancelled"
    slots = httpx.get(f"{server.api}/slots", timeout=30).json()
    assert all(s.get("request_id") != running.id for s in slots["slots"]), slots
    # Ended already: answered as it is.
    again = httpx.post(f"{server.api}/responses/{running.id}/cancel", timeout=60)
    assert again.json()["status"] == "cancelled"


def test_a_running_background_response_deleted_stops_and_stays_deleted(
        long_server: RunningServer) -> None:
    server = long_server
    running = post(server, input="Go on.", max_output_tokens=LONG, temperature=0,
                   background=True)
    deleted = httpx.delete(f"{server.api}/responses/{running.id}", timeout=60)
    assert deleted.status_code == 200, deleted.text
    deadline = time.monotonic() + 30
    while any(s.get("request_id") == running.id
              for s in httpx.get(f"{server.api}/slots", timeout=30).json()["slots"]):
        assert time.monotonic() < deadline, "the deleted response still runs"
        time.sleep(0.05)
    time.sleep(0.2)  # the run's end has been recorded (or not) by now
    assert httpx.get(f"{server.api}/responses/{running.id}", timeout=30).status_code == 404


def test_background_on_a_conversation_holds_it_until_done(long_server: RunningServer) -> None:
    server = long_server
    conversation = httpx.post(f"{server.api}/conversations", json={}, timeout=30).json()
    running = post(server, conversation=conversation["id"], input="Go on.",
                   max_output_tokens=LONG, temperature=0, background=True)
    locked = httpx.post(f"{server.api}/responses", timeout=60, json={
        "model": "m", "conversation": conversation["id"], "input": "And?",
        "max_output_tokens": 1})
    assert locked.json()["error"]["code"] == "conversation_locked", locked.text
    done = until_done(server, running.id)
    items = httpx.get(f"{server.api}/conversations/{conversation['id']}/items",
                      params={"order": "asc"}, timeout=30).json()["data"]
    assert [i["role"] for i in items] == ["user", "assistant"]
    assert items[1]["id"] == done.output[0].id
    assert post(server, conversation=conversation["id"], input="And?",
                max_output_tokens=1).status == "incomplete"


@pytest.mark.parametrize(("method", "path", "body", "param", "words"), [
    ("POST", "/responses", {"model": "m", "input": "x", "background": True, "store": False},
     "background", "store must be true"),
    ("POST", "/responses", {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}],
        "background": True}, "input.0.content.0.image_url", "image"),
])
def test_bad_background_requests_are_400s_at_once(server: RunningServer, method: str,
                                                  path: str, body: dict, param: str,
                                                  words: str) -> None:
    answer = httpx.request(method, f"{server.api}{path}", json=body, timeout=30)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_only_background_responses_cancel_or_stream_later(server: RunningServer) -> None:
    plain = post(server, input="Hi", max_output_tokens=1)
    cancel = httpx.post(f"{server.api}/responses/{plain.id}/cancel", timeout=30)
    assert cancel.status_code == 400 and cancel.json()["error"]["code"] == "not_background"
    streamed = httpx.get(f"{server.api}/responses/{plain.id}", params={"stream": "true"},
                         timeout=30)
    assert streamed.status_code == 400
    assert "not a background response" in streamed.json()["error"]["message"]
    unknown = httpx.post(f"{server.api}/responses/resp_nope/cancel", timeout=30)
    assert unknown.status_code == 404


def test_a_background_run_is_counted_and_logged_when_it_ends(server: RunningServer) -> None:
    """The request only queues it: the run's tokens, status and timings reach the metrics
    and the request log when it ends, once (not as a request that finished with nothing)."""
    def tokens() -> float:
        return metric_value(server.url, "vlserve_completion_tokens_total")

    def finished(reason: str) -> float:
        try:
            return metric_value(server.url, "vlserve_requests_total",
                                f'finish_reason="{reason}",status="200"')
        except AssertionError:  # no such series yet
            return 0.0

    before = (tokens(), finished("length"), finished("none"))
    queued = post(server, input="Say something.", max_output_tokens=5, temperature=0,
                  background=True)
    done = until_done(server, queued.id)
    lines = request_lines(server, queued.id)
    deadline = time.monotonic() + 10
    while len(lines) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        lines = request_lines(server, queued.id)
    assert [line["event"] for line in lines] == ["background_queued", "background_response"]
    assert lines[1]["status"] == 200 and lines[1]["finish_reason"] == "length"
    assert lines[1]["timings"] == done.model_extra["timings"]  # type: ignore[index]
    after = (tokens(), finished("length"), finished("none"))
    assert after == (before[0] + 5, before[1] + 1, before[2])
