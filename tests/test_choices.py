"""`n > 1` in chat completions, end to end on the LLaVA demo model with the openai SDK: the
prompt (with its image) is evaluated once and copied to the other choices' slots; greedy
choices agree, seeded ones follow `seed + i`; streams carry each choice's index; usage counts
every choice; n above the slots is a 400."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import data_url, image_message, photo_bytes
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from server.demo_model import DemoModelPaths

N_PARALLEL = 3


@pytest.fixture(scope="module")
def server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RunningServer]:
    log_path = tmp_path_factory.mktemp("choices") / "server.log"
    # A cap that lets one request hold its slot for seconds (see the queueing test).
    running = start_server(demo_model, log_path, "--n-parallel", str(N_PARALLEL),
                           env={"VLSERVE_MAX_TOKENS_CAP": "2000"})
    yield running
    stop_server(running)


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)


def _image_question(seed: int = 0) -> list:
    return [image_message("What is in this picture?",
                          data_url(photo_bytes(96, 72, seed=seed)))]


def test_greedy_choices_are_identical_and_the_prompt_is_evaluated_once(
        client: openai.OpenAI, server: RunningServer) -> None:
    messages = _image_question(seed=11)
    single = client.chat.completions.create(model="m", messages=messages, temperature=0,
                                            max_tokens=8, extra_body={"ignore_eos": True})
    reply = client.chat.completions.create(model="m", messages=messages, temperature=0, n=3,
                                           max_tokens=8, extra_body={"ignore_eos": True})
    ChatCompletion.model_validate(reply.model_dump())
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = {c.message.content for c in reply.choices}
    # The copies sample from the same logits and KV as the first choice: one answer, and the
    # one a single request gets.
    assert texts == {single.choices[0].message.content}
    assert reply.usage is not None and single.usage is not None
    assert reply.usage.completion_tokens == 3 * 8
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens  # counted once
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 24
    assert f"request {reply.id}: prompt evaluated once for 3 choices" in server.log()


def test_seeded_choices_follow_seed_plus_index(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me a story."}]
    sampled = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16,
               "extra_body": {"ignore_eos": True, "top_k": 0, "min_p": 0.0}}
    reply = client.chat.completions.create(model="m", messages=messages, n=3, seed=40,
                                           **sampled)  # type: ignore[arg-type]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) == 3, texts
    # Choice 1 drew with seed 41: exactly what a single request with that seed draws.
    alone = client.chat.completions.create(model="m", messages=messages, n=1, seed=41,
                                           **sampled)  # type: ignore[arg-type]
    assert alone.choices[0].message.content == texts[1]


def test_streamed_choices_carry_their_index(client: openai.OpenAI) -> None:
    messages = _image_question(seed=12)
    whole = client.chat.completions.create(model="m", messages=messages, temperature=0, n=2,
                                           max_tokens=6, extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(
        model="m", messages=messages, temperature=0, n=2, max_tokens=6, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    texts = {0: "", 1: ""}
    finishes: dict[int, str] = {}
    roles: set[int] = set()
    usage = None
    for chunk in stream:
        ChatCompletionChunk.model_validate(chunk.model_dump())
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.add(choice.index)
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert roles == {0, 1}
    assert finishes == {0: "length", 1: "length"}
    assert texts == {i: c.message.content for i, c in enumerate(whole.choices)}
    assert usage is not None and usage.completion_tokens == 2 * 6


def test_n_with_a_json_response_format(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "A JSON object, please."}], n=2,
        seed=3, temperature=1.0, max_tokens=40, response_format={"type": "json_object"})
    for choice in reply.choices:
        if choice.finish_reason == "stop":  # a cut-off object is the length's fault
            assert isinstance(json.loads(choice.message.content or ""), dict)


def test_n_above_the_slots_is_a_400(server: RunningServer) -> None:
    resp = httpx.post(f"{server.api}/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "n": N_PARALLEL + 1})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "n"
    assert f"at most {N_PARALLEL} choices" in error["message"]
    ok = httpx.post(f"{server.api}/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "n": N_PARALLEL, "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == N_PARALLEL


def test_n_waits_for_a_free_slot_per_choice(server: RunningServer) -> None:
    """With one of the three slots busy, n = 3 stays queued (two free slots are not
    enough), then runs once the busy one is let go."""
    blocker = threading.Event()

    def long_request() -> None:
        with httpx.stream("POST", f"{server.api}/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 2000,
                "ignore_eos": True, "stream": True}) as resp:
            for _ in resp.iter_lines():
                if blocker.is_set():
                    return  # hanging up frees its slot

    busy = threading.Thread(target=long_request)
    busy.start()
    _wait_for(lambda: _status(server)["busy_slots"] == 1, "the long request never took a slot")
    answers: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: answers.append(httpx.post(
        f"{server.api}/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 4,
            "ignore_eos": True})))
    waiting.start()
    try:
        _wait_for(lambda: _status(server)["queue_depth"] == 1, "n = 3 was never queued")
        status = _status(server)
        assert status["busy_slots"] == 1 and status["queue_depth"] == 1  # 2 slots stay free
    finally:
        blocker.set()
        busy.join(120)
        waiting.join(120)
    assert answers and answers[0].status_code == 200, answers
    body = answers[0].json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 12
    assert body["timings"]["queue"] > 0


def _status(server: RunningServer) -> dict:
    return httpx.get(f"{server.api}/slots", timeout=30).json()


def _wait_for(condition: Callable[[], bool], failure: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.02)
