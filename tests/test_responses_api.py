"""The Responses API end to end on the LLaVA demo model, with the openai SDK: every answer
and every streamed event validated against the SDK's own pydantic types; stored responses
continued with previous_response_id (the new turn costs only its new tokens), read back,
listed and deleted."""

from __future__ import annotations

import io
from typing import get_args

import httpx
import openai
import pytest
from conftest import TEST_DEFAULT_MAX_TOKENS, TEST_MAX_TOKENS_CAP, RunningServer
from helpers import data_url, expected_image_tokens, photo_bytes, response_events
from helpers import responses_create as create
from openai.types.responses import Response, ResponseIncludable


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)


def test_a_text_response_validates_with_usage_and_timings(server: RunningServer) -> None:
    reply = create(server, input="Describe a cat.", instructions="Be brief.",
                   max_output_tokens=6, temperature=0)
    assert reply.id.startswith("resp_") and reply.object == "response"
    # Random weights never stop by themselves: the answer ends at max_output_tokens.
    assert reply.status == "incomplete"
    assert reply.incomplete_details is not None
    assert reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage is not None and reply.usage.output_tokens == 6
    assert reply.usage.total_tokens == reply.usage.input_tokens + 6
    assert reply.output_text and reply.output[0].type == "message"
    assert reply.instructions == "Be brief." and reply.temperature == 0
    timings = reply.model_extra["timings"]  # type: ignore[index]
    assert timings["completion_tokens"] == 6
    assert timings["prompt_tokens"] == reply.usage.input_tokens
    assert {"queue", "prompt_eval", "generation", "total"} <= set(timings)
    # The instructions are the system turn: without them, the prompt is shorter.
    plain = create(server, input="Describe a cat.", max_output_tokens=1)
    assert plain.usage is not None and plain.usage.input_tokens < reply.usage.input_tokens


def test_the_sdk_and_v1_path_answer(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    raw = client.responses.with_raw_response.create(model="m", input="Hi", max_output_tokens=3,
                                                   temperature=0)
    reply = raw.parse()
    assert raw.headers["x-request-id"] == reply.id  # the log line's id is the response's
    assert reply.usage is not None and reply.usage.output_tokens == 3
    assert reply.output_text == reply.output[0].content[0].text  # type: ignore[union-attr]


def test_nulls_for_nullable_fields_take_their_defaults(client: openai.OpenAI,
                                                      server: RunningServer) -> None:
    """OpenAI's spec makes stream, store and background nullable: null (the SDK's None)
    is the default (not streamed, stored, in the foreground), as top_p 0 is greedy."""
    answer = httpx.post(f"{server.api}/responses", timeout=60, json={
        "input": "Hi", "max_output_tokens": 3, "stream": None, "store": None,
        "background": None, "top_p": 0, "temperature": 1.5,
        "reasoning": {"effort": "xhigh"}})
    assert answer.status_code == 200, answer.text
    reply = Response.model_validate(answer.json())
    assert reply.status == "incomplete" and reply.background is False
    assert client.responses.retrieve(reply.id).output_text == reply.output_text  # stored
    greedy = create(server, input="Hi", max_output_tokens=3, temperature=0)
    assert reply.output_text == greedy.output_text


def test_max_output_tokens_has_chats_default_and_cap(server: RunningServer) -> None:
    # Greedy: a sampled answer can draw the end-of-turn token even from random weights.
    default = create(server, input="Go on.", temperature=0)
    assert default.usage is not None and default.usage.output_tokens == TEST_DEFAULT_MAX_TOKENS
    capped = create(server, input="Go on.", max_output_tokens=10_000, temperature=0)
    assert capped.usage is not None and capped.usage.output_tokens == TEST_MAX_TOKENS_CAP


def test_the_stream_is_the_full_event_sequence(server: RunningServer) -> None:
    events = response_events(server.api, {"model": "m", "input": "Say something.",
                                        "max_output_tokens": 5, "temperature": 0})
    kinds = [e["type"] for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * 5,
                     "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.incomplete"]
    final = Response.model_validate(events[-1]["response"])
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == events[-4]["text"] == final.output_text
    item_ids = {e["item_id"] for e in events if "item_id" in e}
    assert item_ids == {final.output[0].id}  # type: ignore[union-attr]
    assert events[0]["response"]["status"] == "in_progress" and final.status == "incomplete"
    assert final.usage is not None and final.usage.output_tokens == 5
    assert "timings" in events[-1]["response"]
    # The same answer, not streamed (greedy: the same text).
    whole = create(server, input="Say something.", max_output_tokens=5, temperature=0)
    assert whole.output_text == final.output_text


def test_logprobs_of_the_answer_as_chat_gives_them(server: RunningServer,
                                                  client: openai.OpenAI) -> None:
    asked = {"input": "Say something.", "max_output_tokens": 5, "temperature": 0,
             "include": ["message.output_text.logprobs"], "top_logprobs": 2}
    whole = create(server, **asked)
    assert whole.top_logprobs == 2
    part = whole.output[0].content[0]  # type: ignore[union-attr]
    assert len(part.logprobs) == 5 and all(len(lp.top_logprobs) == 2 for lp in part.logprobs)
    assert "".join(lp.token for lp in part.logprobs).lstrip() == part.text.lstrip()
    # The same prompt as a chat: the same tokens, the same log-probabilities.
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Say something."}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert [(lp.token, lp.logprob) for lp in part.logprobs] == \
        [(lp.token, pytest.approx(lp.logprob)) for lp in content]
    # Streamed: each delta carries its tokens' logprobs; the done events all of them.
    events = response_events(server.api, {"model": "m", **asked})
    streamed = [lp for e in events if e["type"] == "response.output_text.delta"
                for lp in e["logprobs"]]
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert streamed == done["logprobs"] == events[-1]["response"]["output"][0]["content"][0][
        "logprobs"]
    # Another request than `whole`: its prompt came from the prefix cache, which can move
    # the last digits (seen: 6e-7 when this test runs alone).
    assert [(lp["token"], lp["logprob"]) for lp in streamed] == \
        [(lp.token, pytest.approx(lp.logprob)) for lp in part.logprobs]
    assert [[t["token"] for t in lp["top_logprobs"]] for lp in streamed] == \
        [[t.token for t in lp.top_logprobs] for lp in part.logprobs]
    # Not asked for: none.
    plain = create(server, input="Say something.", max_output_tokens=2)
    assert plain.output[0].content[0].logprobs == []  # type: ignore[union-attr]


def test_the_sdk_reads_the_stream(client: openai.OpenAI) -> None:
    with client.responses.stream(model="m", input="Say something.", max_output_tokens=4,
                                 temperature=0) as stream:
        events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    # Cut at max_output_tokens, as OpenAI's: response.incomplete, not response.completed
    # (whose stream.get_final_response() tests/test_responses_constrained.py reads).
    last = events[-1]
    assert last.type == "response.incomplete"
    assert len(deltas) == 4 and "".join(deltas) == last.response.output_text


def test_an_image_by_data_url_and_by_file_id(client: openai.OpenAI,
                                             server: RunningServer) -> None:
    png = photo_bytes(64, 48)
    image_tokens = expected_image_tokens("llava", 64, 48)
    text = {"type": "input_text", "text": "What is this?"}
    by_url = create(server, max_output_tokens=2, input=[{"role": "user", "content": [
        text, {"type": "input_image", "image_url": data_url(png), "detail": "auto"}]}])
    assert by_url.model_extra["timings"]["image_tokens"] == image_tokens  # type: ignore[index]
    upload = client.files.create(file=("a.png", io.BytesIO(png), "image/png"),
                                 purpose="vision")  # type: ignore[arg-type]
    by_file = create(server, max_output_tokens=2, input=[{"type": "message", "role": "user",
                     "content": [text, {"type": "input_image", "file_id": upload.id,
                                        "detail": "high"}]}])
    assert by_file.model_extra["timings"]["image_tokens"] == image_tokens  # type: ignore[index]
    assert by_file.usage is not None and by_url.usage is not None
    assert by_file.usage.input_tokens == by_url.usage.input_tokens


def test_previous_response_id_costs_only_the_new_tokens(client: openai.OpenAI,
                                                        server: RunningServer) -> None:
    first = client.responses.create(model="m", input="Tell me about owls.",
                                    instructions="Answer briefly.", max_output_tokens=6,
                                    temperature=0)
    second = client.responses.create(model="m", previous_response_id=first.id,
                                     instructions="Answer briefly.", input="And bats?",
                                     max_output_tokens=6, temperature=0)
    assert first.usage is not None and second.usage is not None
    assert second.previous_response_id == first.id
    cached = second.usage.input_tokens_details.cached_tokens
    # The slot still holds turn 1's prompt (and its answer): only the new turn is evaluated.
    assert cached >= first.usage.input_tokens
    assert second.usage.input_tokens - cached <= 6 + 20, second.usage
    # The same conversation sent whole is the same prompt, token for token.
    whole = create(server, instructions="Answer briefly.", max_output_tokens=6, temperature=0,
                   input=[{"role": "user", "content": "Tell me about owls."},
                          {"role": "assistant", "content": first.output_text},
                          {"role": "user", "content": "And bats?"}])
    assert whole.usage is not None and whole.usage.input_tokens == second.usage.input_tokens
    assert whole.output_text == second.output_text


def test_stored_responses_are_read_listed_and_deleted(client: openai.OpenAI,
                                                      server: RunningServer) -> None:
    made = create(server, input=[{"role": "user", "content": "One."},
                                 {"role": "user", "content": [
                                     {"type": "input_text", "text": "Two."}]}],
                  max_output_tokens=2)
    got = httpx.get(f"{server.api}/responses/{made.id}", timeout=30)
    assert got.status_code == 200
    assert Response.model_validate(got.json()) == made
    assert client.responses.retrieve(made.id).output_text == made.output_text
    items = client.responses.input_items.list(made.id, order="asc")
    assert [i.content[0].text for i in items.data] == ["One.", "Two."]  # type: ignore[union-attr]
    assert all(i.id.startswith("msg_") for i in items.data)
    page = client.responses.input_items.list(made.id, order="asc", limit=1)
    assert page.has_more and len(page.data) == 1
    deleted = httpx.delete(f"{server.api}/responses/{made.id}", timeout=30)
    assert deleted.json() == {"id": made.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.retrieve(made.id)
    assert gone.value.body["code"] == "response_not_found"  # type: ignore[index]
    continued = httpx.post(f"{server.api}/responses", timeout=30, json={
        "input": "Three.", "previous_response_id": made.id})
    assert continued.status_code == 404
    assert continued.json()["error"]["param"] == "previous_response_id"
    for method in ("GET", "DELETE"):
        unknown = httpx.request(method, f"{server.api}/responses/resp_nope", timeout=30)
        assert unknown.status_code == 404
        assert unknown.json()["error"]["type"] == "not_found_error"


def test_store_false_keeps_nothing(server: RunningServer) -> None:
    made = create(server, input="Hi", max_output_tokens=1, store=False)
    assert made.store is False
    assert httpx.get(f"{server.api}/responses/{made.id}", timeout=30).status_code == 404


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
     "input.0.content.0", "exactly one of image_url and file_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-x"}]}]},
     "input.0.content.0.file.file_id", "no uploaded file 'file-x'"),
    ({"input": [{"role": "assistant", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]},
     "input.0.content.0", "images are only accepted in user messages"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a",
                                        "schema": {"type": "object", "not": {}}}}},
     "text.format.schema", "text.format.schema: #/not: not supported"),
    ({"input": "x", "tools": [{"type": "function", "name": "f"}],
      "tool_choice": {"type": "function", "name": "g"}},
     "tool_choice.name", "no function named 'g'"),
    ({"input": "x", "tools": [{"type": "function", "name": "f",
                               "parameters": {"type": "object", "not": {}}}]},
     "tools.0.parameters", "tools.0.parameters"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type",
     "Input should be 'function'"),
    ({"input": "x", "previous_response_id": "resp_unknown"}, "previous_response_id",
     "no stored response with id 'resp_unknown'"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
    ({"input": []}, "input", "at least one item"),
    ({"input": "x", "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"input": "x", "text": {"verbosity": "low"}}, "text.verbosity",
     "no verbosity control"),
    ({"input": "x", "service_tier": 5}, "service_tier", "Input should be a valid string"),
    ({"input": "x", "include": ["message.output_text.logprobs", "reasoning.summary"]},
     "include.1", "Input should be 'file_search_call.results'"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": ""}] * 3000}] * 2},
     None, "input: at most 4096 content parts in all, not 6000"),
])
def test_bad_requests_are_named(server: RunningServer, body: dict, param: str,
                                words: str) -> None:
    answer = httpx.post(f"{server.api}/responses", json=body, timeout=30)
    assert answer.status_code in (400, 404), answer.text
    error = answer.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert create(server, input="still there?", max_output_tokens=1).usage is not None


def test_every_openai_include_value_is_accepted(server: RunningServer) -> None:
    """The SDK's own list: those with nothing to add here are no 400 (as OpenAI, without
    such a call), and logprobs among them are still served."""
    every = list(get_args(ResponseIncludable))
    answer = create(server, input="hi", max_output_tokens=2, include=every)
    part = answer.output[-1].content[0]  # type: ignore[union-attr]
    assert part.logprobs and len(part.logprobs) == answer.usage.output_tokens


def test_service_tier_and_medium_verbosity_are_echoed(server: RunningServer) -> None:
    answer = create(server, input="hi", max_output_tokens=1, service_tier="ultrafast",
                    text={"verbosity": "medium"})
    assert answer.service_tier == "default"
    assert answer.text is not None and answer.text.verbosity == "medium"
    plain = httpx.post(f"{server.api}/responses", timeout=30,
                       json={"input": "hi", "max_output_tokens": 1}).json()
    assert "service_tier" not in plain
