"""Responses `truncation: "auto"` on the LLaVA demo model (a 1024-token context in the
tests): a conversation longer than the context loses its oldest turns, no more than it must,
whole turns only, instructions kept; the stored conversation goes on from what was kept.
Counts are checked against POST /tokenize on the same messages."""

from __future__ import annotations

import httpx
import pytest
from conftest import TEST_DEFAULT_MAX_TOKENS, TEST_N_CTX, RunningServer
from helpers import data_url, expected_image_tokens, photo_bytes, response_events
from helpers import responses_create as create

INSTRUCTIONS = "Answer in one line."
# Budget for the prompt: the context less the answer's max_output_tokens.
BUDGET = TEST_N_CTX - 1 - TEST_DEFAULT_MAX_TOKENS


def turns(n: int) -> list[dict]:
    """n user/assistant pairs of ~100 tokens each, the newest question last."""
    out: list[dict] = []
    for i in range(n):
        out.append({"role": "user", "content": f"Question {i}: " + "tell me more " * 30})
        out.append({"role": "assistant", "content": f"Answer {i}: " + "there is more " * 30})
    return [*out, {"role": "user", "content": "And now?"}]


def count(server: RunningServer, messages: list[dict]) -> int:
    answer = httpx.post(f"{server.api}/tokenize", timeout=60, json={
        "messages": [{"role": "system", "content": INSTRUCTIONS}, *messages]})
    assert answer.status_code == 200, answer.text
    return int(answer.json()["count"])


def test_the_oldest_turns_go_no_more_than_needed(server: RunningServer) -> None:
    conversation = turns(12)
    assert count(server, conversation) > TEST_N_CTX  # too long as it is
    refused = httpx.post(f"{server.api}/responses", timeout=60, json={
        "model": "m", "input": conversation, "instructions": INSTRUCTIONS})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "context_length_exceeded"

    reply = create(server, input=conversation, instructions=INSTRUCTIONS, truncation="auto")
    assert reply.truncation == "auto" and reply.output_text
    assert reply.usage is not None
    # The prompt is the instructions plus the turns from some user turn on; one user turn
    # earlier would not have fit.
    starts = [i for i, m in enumerate(conversation) if m["role"] == "user"]
    kept = [i for i in starts if count(server, conversation[i:]) == reply.usage.input_tokens]
    assert kept, reply.usage
    cut = kept[0]
    assert 0 < cut < len(conversation) - 1 and reply.usage.input_tokens <= BUDGET
    assert count(server, conversation[cut - 2:]) > BUDGET

    streamed = response_events(server.api, {"model": "m", "input": conversation,
                                            "instructions": INSTRUCTIONS, "truncation": "auto"})
    assert streamed[-1]["response"]["usage"]["input_tokens"] == reply.usage.input_tokens


def test_the_next_turn_goes_on_from_what_was_kept(server: RunningServer) -> None:
    first = create(server, input=turns(12), instructions=INSTRUCTIONS, truncation="auto")
    # The stored conversation is the kept turns (plus the answer): a next turn fits without
    # truncating again.
    second = create(server, input="One more thing.", previous_response_id=first.id,
                    instructions=INSTRUCTIONS)
    assert second.truncation == "disabled" and second.usage is not None
    assert second.usage.input_tokens <= TEST_N_CTX
    items = httpx.get(f"{server.api}/responses/{second.id}/input_items", timeout=30).json()
    assert [i["content"][0]["text"] for i in items["data"]] == ["One more thing."]


def test_the_newest_turn_alone_too_long_is_still_a_400(server: RunningServer) -> None:
    huge = [{"role": "user", "content": "tell me more " * 600}]
    answer = httpx.post(f"{server.api}/responses", timeout=60, json={
        "model": "m", "input": huge, "truncation": "auto"})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("value", ["on", 1])
def test_truncation_takes_auto_or_disabled(server: RunningServer, value: object) -> None:
    answer = httpx.post(f"{server.api}/responses", timeout=60,
                        json={"model": "m", "input": "Hi", "truncation": value})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "truncation"


def test_a_leading_system_message_stays_with_the_kept_turns(server: RunningServer) -> None:
    """A system (developer) message the input starts with is kept in the prompt, and so in
    the stored conversation the next turn continues from."""
    conversation = turns(12)
    first = create(server, input=[{"role": "developer", "content": INSTRUCTIONS},
                                  *conversation], truncation="auto")
    assert first.usage is not None
    starts = [i for i, m in enumerate(conversation) if m["role"] == "user"]
    (cut,) = [i for i in starts if count(server, conversation[i:]) == first.usage.input_tokens]
    second = create(server, input="One more thing.", previous_response_id=first.id)
    assert second.usage is not None
    # count() puts the system message first, as the stored conversation must.
    assert second.usage.input_tokens == count(server, [
        *conversation[cut:], {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "One more thing."}])


def test_too_many_images_go_with_their_oldest_turns(server: RunningServer) -> None:
    """An image chat outgrows max_images_per_request (8 in the tests) long before the
    context: with "auto" the oldest turns go until the images left are allowed, and only
    those are decoded; the count endpoint says the same."""
    turns_: list[dict] = []
    for i in range(10):
        turns_.append({"role": "user", "content": [
            {"type": "input_text", "text": f"Picture {i}?"},
            {"type": "input_image", "image_url": data_url(photo_bytes(20 + i, 16))}]})
        turns_.append({"role": "assistant", "content": f"Answer {i}."})
    turns_.append({"role": "user", "content": "Which was best?"})
    refused = httpx.post(f"{server.api}/responses", timeout=60,
                         json={"model": "m", "input": turns_})
    assert refused.status_code == 400 and "too many images" in refused.json()["error"]["message"]
    reply = create(server, input=turns_, truncation="auto", max_output_tokens=1)
    timings = reply.model_extra["timings"]  # type: ignore[index]
    assert timings["image_tokens"] == 8 * expected_image_tokens("llava", 20, 16)
    kept = turns_[4:]  # the two oldest turns went, whole
    chat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else [
        {"type": "text", "text": p["text"]} if p["type"] == "input_text"
        else {"type": "image_url", "image_url": {"url": p["image_url"]}}
        for p in m["content"]]} for m in kept]
    counted = httpx.post(f"{server.api}/tokenize", json={"messages": chat}, timeout=60)
    assert reply.usage is not None and reply.usage.input_tokens == counted.json()["count"]
    count = httpx.post(f"{server.api}/responses/input_tokens", timeout=60, json={
        "model": "m", "input": turns_, "truncation": "auto", "max_output_tokens": 1})
    assert count.json()["input_tokens"] == reply.usage.input_tokens
    # The stored conversation goes on from what was kept: 8 images, allowed as they are.
    follow = create(server, previous_response_id=reply.id, input="And now?",
                    max_output_tokens=1)
    assert follow.model_extra["timings"]["image_tokens"] == timings["image_tokens"]  # type: ignore[index]
