"""Prefix reuse, batching across slots, backpressure, cancellation and timeouts."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import data_url, expected_image_tokens, image_message, photo_bytes

from server.demo_model import DemoModelPaths
from server.engine.scheduler import SPILL_AFTER_TOKENS

LONG = 3000  # tokens: long enough (a few hundred ms on the tiny model) to keep a slot busy


@pytest.fixture(scope="module")
def busy_server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[RunningServer]:
    """Two slots, a queue of one, and room for long generations."""
    running = start_server(
        demo_model, tmp_path_factory.mktemp("busy") / "server.log",
        "--n-parallel", "2", "--n-ctx", "4096",
        env={"VLSERVE_MAX_QUEUE": "1", "VLSERVE_MAX_TOKENS_CAP": str(LONG),
             "VLSERVE_DEFAULT_MAX_TOKENS": str(LONG),
             # Idle slots move only when a request runs long: the spill is what
             # test_idle_conversations_wait_in_ram_and_come_back checks, and no quiet
             # moment of the test client's may copy them ahead of it.
             "VLSERVE_PROMPT_CACHE_COPY_AHEAD": "false"},
    )
    yield running
    stop_server(running)


def chat(server: RunningServer, messages: list[dict], **params: object) -> dict:
    body = {"messages": messages, "temperature": 0, **params}
    resp = httpx.post(f"{server.api}/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def slots(server: RunningServer) -> dict:
    return httpx.get(f"{server.api}/slots", timeout=10).json()


def wait_idle(server: RunningServer, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while slots(server)["busy_slots"]:
        assert time.monotonic() < deadline, slots(server)
        time.sleep(0.02)


def test_turn_two_reuses_image_and_prefix_with_the_cold_answer(
        family_server: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = family_server
    image = data_url(photo_bytes(400, 300, seed=21))
    turn1 = [image_message("What is this?", image)]
    first = chat(server, turn1, max_tokens=6)
    assert first["timings"]["image_tokens"] == expected_image_tokens(server.family, 400, 300)
    turn2 = [*turn1, {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
             {"role": "user", "content": "Tell me more."}]
    warm = chat(server, turn2, max_tokens=8)
    timings = warm["timings"]
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] >= (
        first["timings"]["image_tokens"] + 5)
    assert timings["image_encode"] == 0, "turn 2 must not run the vision encoder again"

    cold_server = start_server(server.models, tmp_path_factory.mktemp("cold") / "server.log",
                               family=server.family)
    try:
        cold = chat(cold_server, turn2, max_tokens=8)
    finally:
        stop_server(cold_server)
    # At most the template's preamble is reused from the cold server's warm-up request (for
    # Youtu-VL that is its default system turn, 14 tokens), never the image.
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] < 20
    assert cold["timings"]["image_encode"] > 0
    assert warm["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"]


def test_repeated_image_hits_the_embedding_cache(family_server: RunningServer) -> None:
    server = family_server
    image = data_url(photo_bytes(300, 200, seed=33))
    chat(server, [image_message("First question?", image)], max_tokens=2)
    # A different text before the image forces its KV to be recomputed, but not encoded.
    again = chat(server, [{"role": "system", "content": "New system prompt."},
                          image_message("Other question?", image)], max_tokens=2)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] < 10
    assert again["timings"]["image_encode"] == 0
    assert again["timings"]["image_cache_hits"] == 1


def test_concurrent_clients_get_their_single_client_answers(family_server: RunningServer
                                                           ) -> None:
    """Batching must not mix sequences. Bit-equality with a lone run is not guaranteed: a
    mixed batch takes other matmul/attention kernels (another summation order) than a lone
    sequence, and the KV cache and flash attention work in F16 (about 1e-3 relative), so
    logprobs differ by ~1e-3. So: per-token logprobs must agree within 0.02, and where a
    greedy answer diverges, the lone run must have had a near-tie (< 0.05) there. Mixed-up
    sequences would differ by whole units from the first token on."""
    server = family_server
    prompts = [[{"role": "user", "content": f"Client {i} asks about topic {i * 7}."}]
               if i % 2 else [image_message(f"Picture {i}?", data_url(photo_bytes(
                   120 + i * 10, 90, seed=i)))] for i in range(8)]
    params = {"max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    alone = [chat(server, p, **params)["choices"][0]["logprobs"]["content"] for p in prompts]

    async def together() -> list[list]:
        async with httpx.AsyncClient(timeout=60) as client:
            replies = await asyncio.gather(*(
                client.post(f"{server.api}/chat/completions",
                            json={"messages": p, **params}) for p in prompts))
        return [r.json()["choices"][0]["logprobs"]["content"] for r in replies]

    for solo, batched in zip(alone, asyncio.run(together()), strict=True):
        assert solo and batched
        for step, (a, b) in enumerate(zip(solo, batched, strict=False)):
            if a["token"] != b["token"]:
                top = a["top_logprobs"]
                assert b["token"] in {t["token"] for t in top}, (step, a, b)
                assert abs(top[0]["logprob"] - top[1]["logprob"]) < 0.05, (step, a, b)
                break
            assert abs(a["logprob"] - b["logprob"]) < 0.02, (step, a, b)
        else:
            assert len(solo) == len(batched)


def test_logprobs_shape(server: RunningServer) -> None:
    body = chat(server, [{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True,
                top_logprobs=3)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert tops == sorted(tops, reverse=True)
        assert entry["logprob"] == pytest.approx(tops[0], abs=1e-6)  # greedy takes the best
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
    bad = httpx.post(f"{server.api}/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})
    assert bad.status_code == 400


def test_full_queue_answers_429_with_retry_after(busy_server: RunningServer) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": LONG,
                    "ignore_eos": True}
            return list(await asyncio.gather(*(
                client.post(f"{busy_server.api}/chat/completions", json=body)
                for _ in range(8))))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 3  # two slots + one queued
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected, codes
    assert set(codes) <= {200, 429}
    for resp in rejected:
        assert resp.headers["retry-after"]
        assert resp.json()["error"]["code"] == "queue_full"
    wait_idle(busy_server)


def test_disconnected_stream_frees_its_slot_and_others_continue(
        busy_server: RunningServer) -> None:
    wait_idle(busy_server)
    body = {"messages": [{"role": "user", "content": "Stream a lot."}], "max_tokens": LONG,
            "stream": True, "ignore_eos": True}

    async def scenario() -> tuple[int, list[str]]:
        async with httpx.AsyncClient(timeout=60) as client:
            async def survivor() -> list[str]:
                async with client.stream("POST", f"{busy_server.api}/chat/completions",
                                         json={**body, "max_tokens": 400}) as resp:
                    return [line async for line in resp.aiter_lines() if line]

            keep = asyncio.create_task(survivor())
            async with client.stream("POST", f"{busy_server.api}/chat/completions",
                                     json=body) as resp:
                seen = 0
                async for line in resp.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen >= 5:
                        break  # leaving the block closes the connection mid-stream
            return seen, await keep

    seen, survivor_lines = asyncio.run(scenario())
    assert seen >= 5
    wait_idle(busy_server, timeout=5)
    assert survivor_lines[-1] == "data: [DONE]"
    finish = [json.loads(x[6:]) for x in survivor_lines if x.startswith("data: {")][-1]
    assert finish["choices"][0]["finish_reason"] in ("length", "stop")
    # The engine stopped the abandoned request early and says so.
    cancelled = re.findall(r"cancelled \(client gone\) after (\d+) tokens", busy_server.log())
    assert cancelled and int(cancelled[-1]) < LONG
    statuses = [json.loads(x)["status"] for x in busy_server.log().splitlines()
                if x.startswith("{") and '"chat_completion"' in x]
    assert 499 in statuses


def test_disconnected_non_streaming_request_is_cancelled(busy_server: RunningServer) -> None:
    wait_idle(busy_server)
    pattern = re.compile(r"cancelled \(client gone\) after (\d+) tokens")
    before = len(pattern.findall(busy_server.log()))
    body = {"messages": [{"role": "user", "content": "Write forever."}], "max_tokens": LONG,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{busy_server.api}/chat/completions", json=body, timeout=0.05)
    wait_idle(busy_server, timeout=5)
    cancelled = pattern.findall(busy_server.log())
    assert len(cancelled) == before + 1 and int(cancelled[-1]) < LONG


def test_request_timeout_ends_with_an_error(demo_model: DemoModelPaths,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    running = start_server(demo_model, tmp_path_factory.mktemp("timeout") / "server.log",
                           "--n-ctx", "4096",
                           env={"VLSERVE_REQUEST_TIMEOUT": "0.02",
                                "VLSERVE_MAX_TOKENS_CAP": str(LONG)})
    try:
        body = {"messages": [{"role": "user", "content": "Write forever."}], "max_tokens": LONG,
            "ignore_eos": True}
        resp = httpx.post(f"{running.api}/chat/completions", json=body, timeout=60)
        assert resp.status_code == 504, resp.text
        assert resp.json()["error"]["code"] == "timeout"
        assert slots(running)["busy_slots"] == 0
        short = httpx.post(f"{running.api}/chat/completions", timeout=60,
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        assert short.status_code == 200
    finally:
        stop_server(running)


def test_slots_endpoint(server: RunningServer) -> None:
    state = slots(server)
    assert state["queue_depth"] == 0
    assert len(state["slots"]) == 2
    assert {s["state"] for s in state["slots"]} <= {"idle", "prefill", "generating"}


def test_ignore_eos_runs_to_max_tokens(busy_server: RunningServer) -> None:
    for seed in range(3):
        reply = chat(busy_server, [{"role": "user", "content": f"Say little {seed}."}],
                     max_tokens=200, temperature=1.5, seed=seed, ignore_eos=True)
        assert reply["usage"]["completion_tokens"] == 200
        assert reply["choices"][0]["finish_reason"] == "length"


def test_a_second_question_about_a_running_requests_image_copies_its_kv(
        busy_server: RunningServer) -> None:
    """Two questions about one image at once (a batch, two users): the second request's
    slot gets the first one's evaluated prefix, image included, as a KV copy instead of
    evaluating the image again."""
    wait_idle(busy_server)
    image = data_url(photo_bytes(80, 60, seed=4242))

    def question(text: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": text}]}]

    first = {"messages": question("Describe it at length."),
             "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as client, client.stream(
            "POST", f"{busy_server.api}/chat/completions", json=first) as running:
        for line in running.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # its prompt, image included, is in its slot's KV now
        second = chat(busy_server, question("What colour is it?"), max_tokens=2)
    image_tokens = expected_image_tokens("llava", 80, 60)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= image_tokens + 5
    assert second["timings"]["image_encode"] == 0  # the embedding was never needed
    wait_idle(busy_server)


def test_idle_conversations_wait_in_ram_and_come_back(busy_server: RunningServer) -> None:
    """Idle slots not copied ahead (here: prompt_cache_copy_ahead off; else a busy engine's)
    move once a request has run SPILL_AFTER_TOKENS into an answer that may run as long again:
    the idle slots' KV goes to host RAM and out of the KV cache (the rest of the answer
    attends over its own cells only); a short answer leaves them in place (the copy stalls
    every stream). The conversation that continues later gets its prefix back from RAM,
    image included, not evaluated again."""
    wait_idle(busy_server)
    image = data_url(photo_bytes(90, 70, seed=5151))
    turn1 = [image_message("What is in this picture?", image)]
    answer = chat(busy_server, turn1, max_tokens=6)
    chat(busy_server, [{"role": "user", "content": "A short one, please."}], max_tokens=4)
    held = [s["n_past"] for s in slots(busy_server)["slots"]]
    assert all(n > 0 for n in held), held
    long = chat(busy_server, [{"role": "user", "content": "An unrelated question, please."}],
                max_tokens=2 * SPILL_AFTER_TOKENS, ignore_eos=True)
    # Only the slot the long request used holds anything now.
    held = [s["n_past"] for s in slots(busy_server)["slots"]]
    assert sorted(held)[:-1] == [0] * (len(held) - 1), held
    assert max(held) >= long["usage"]["total_tokens"]
    turn2 = [*turn1, {"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
             {"role": "user", "content": "And the colours?"}]
    again = chat(busy_server, turn2, max_tokens=2)
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= answer["usage"]["prompt_tokens"], (cached, answer["usage"])
    assert again["timings"]["image_encode"] == 0
