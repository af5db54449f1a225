"""KV capacity without silent truncation (issue 15, Build 1).

The slots share one KV cache. When a step does not fit, the request admitted last steps
aside (its KV freed, its generated tokens kept) and resumes later: every request still ends
only for its own reasons. Before, four streams of 300 tokens in a 512-cell context all
ended `length` after 99 to 144 tokens.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import data_url, image_message, metric_value, photo_bytes

from server.demo_model import DemoModelPaths

T = TypeVar("T")

N_CTX = 512
WANT = 300


@pytest.fixture(scope="module")
def tight_server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[RunningServer]:
    running = start_server(demo_model, tmp_path_factory.mktemp("kv") / "server.log",
                           "--n-parallel", "4", "--n-ctx", str(N_CTX),
                           env={"VLSERVE_MAX_TOKENS_CAP": "1000"})
    yield running
    stop_server(running)


def body(text: str, **extra: object) -> dict:
    return {"messages": [{"role": "user", "content": text}], "temperature": 0,
            "max_tokens": WANT, "ignore_eos": True, **extra}


def stream(server: RunningServer, request: dict, first: threading.Event | None = None
           ) -> tuple[list[dict], dict, str, str | None]:
    """The streamed tokens (with logprobs), the final timings, the id and finish_reason."""
    tokens: list[dict] = []
    timings, reason, reply_id = {}, None, ""
    with httpx.Client(timeout=120) as client, client.stream(
            "POST", f"{server.api}/chat/completions",
            json={**request, "stream": True, "logprobs": True, "top_logprobs": 2}) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            reply_id = chunk["id"]
            if first is not None:
                first.set()
            for choice in chunk.get("choices", []):
                tokens.extend((choice.get("logprobs") or {}).get("content") or [])
                reason = choice.get("finish_reason") or reason
            timings = chunk.get("timings") or timings
    return tokens, timings, reply_id, reason


def preemptions_total(server: RunningServer) -> float:
    return metric_value(server.url, "vlserve_preemptions_total")


def after_three_streams(server: RunningServer, late: Callable[[], T]) -> T:
    """`late()` once three long streams have started, so its request is admitted last:
    the one that steps aside when the cache fills. Its result, once all four are done."""
    started = [threading.Event() for _ in range(3)]
    jobs = [lambda i=i: stream(server, body(f"Count to {i}."), started[i]) for i in range(3)]

    def after() -> T:
        for event in started:
            assert event.wait(120)
        return late()

    *_, result = run_parallel([*jobs, after])
    return result


def run_parallel(jobs: list) -> list:
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as exc:  # re-raised below, on the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    if errors:
        raise errors[0]
    return results


def test_four_streams_that_overflow_the_kv_cache_each_get_all_their_tokens(
        tight_server: RunningServer) -> None:
    before = preemptions_total(tight_server)
    replies = run_parallel([
        lambda i=i: httpx.post(f"{tight_server.api}/chat/completions",
                               json=body(f"Tell story {i}."), timeout=300).json()
        for i in range(4)])
    for reply in replies:
        assert reply["usage"]["completion_tokens"] == WANT, reply
        assert reply["choices"][0]["finish_reason"] == "length"
    # 4 x (prompt + 300) positions cannot share 512 cells: someone stepped aside, and said so.
    preempted = sum(r["timings"]["preemptions"] for r in replies)
    assert preempted >= 1
    assert preemptions_total(tight_server) - before == preempted
    assert "preempted after" in tight_server.log()
    assert "llama_decode failed" not in tight_server.log()


def test_a_preempted_stream_equals_its_undisturbed_twin(tight_server: RunningServer) -> None:
    """Resuming re-evaluates prompt + generated tokens, so the stream goes on where it was.
    As with any batching (see test_concurrent_clients_get_their_single_client_answers),
    the re-evaluated KV is equal only up to float rounding: logprobs agree within 0.02, and
    a greedy answer may part from its twin only at a near-tie. A token lost or repeated at
    the resume would part them there, by whole units."""
    twin = body("Describe a lighthouse.")
    alone, alone_timings, _, alone_reason = stream(tight_server, twin)
    assert alone_timings["preemptions"] == 0 and alone_reason == "length"
    assert len(alone) == WANT
    tokens, timings, reply_id, reason = after_three_streams(
        tight_server, lambda: stream(tight_server, twin))
    assert timings["preemptions"] >= 1, timings
    assert len(tokens) == timings["completion_tokens"] == WANT and reason == "length"
    assert_twins(tight_server, alone, tokens, reply_id, timings)


def assert_twins(server: RunningServer, alone: list[dict], tokens: list[dict], reply_id: str,
                 timings: dict) -> None:
    """Equal greedy tokens up to a near-tie of the lone run, and past a resume point."""
    preempted_at = [int(n) for n in re.findall(
        rf"request {reply_id} preempted after (\d+) tokens", server.log())]
    assert len(preempted_at) == timings["preemptions"]
    agreed = 0
    for a, b in zip(alone, tokens, strict=True):
        if a["token"] != b["token"]:
            top = a["top_logprobs"]
            assert abs(top[0]["logprob"] - top[1]["logprob"]) < 0.05, (agreed, a, b)
            break
        assert abs(a["logprob"] - b["logprob"]) < 0.02, (agreed, a, b)
        agreed += 1
    # The twins agreed across a resume point: that is what this test is about.
    assert agreed > min(preempted_at), (agreed, preempted_at)


def test_a_preempted_image_request_resumes_from_its_cached_embedding(
        tight_server: RunningServer) -> None:
    """The image goes back into KV from the embedding cache (the prompt's chunks stay open
    until the request ends), not through the encoder again."""
    twin = {**body("x"), "messages": [image_message(
        "What is it?", data_url(photo_bytes(64, 48, seed=31)))]}
    alone, alone_timings, _, _ = stream(tight_server, twin)
    assert alone_timings["preemptions"] == 0 and len(alone) == WANT
    tokens, timings, reply_id, reason = after_three_streams(
        tight_server, lambda: stream(tight_server, twin))
    assert timings["preemptions"] >= 1, timings
    assert timings["image_tokens"] == alone_timings["image_tokens"] > 0
    assert timings["image_encode"] == 0 and timings["image_cache_hits"] == 1  # cached
    assert len(tokens) == WANT and reason == "length"
    assert_twins(tight_server, alone, tokens, reply_id, timings)


def test_a_request_that_cannot_fit_even_alone_is_clipped_at_admission(
        tight_server: RunningServer) -> None:
    reply = httpx.post(f"{tight_server.api}/chat/completions",
                       json=body("Go on.", max_tokens=900), timeout=120).json()
    prompt = reply["usage"]["prompt_tokens"]
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == N_CTX - prompt
    assert re.search(rf"max_tokens 900 clipped to {N_CTX - prompt}\b", tight_server.log())


PART = {"type": "string", "minLength": 200, "maxLength": 256}
STORY = {"type": "object", "properties": {"story": {"type": "array", "items": PART,
                                                    "minItems": 2, "maxItems": 2}},
         "required": ["story"], "additionalProperties": False}


def test_a_preempted_constrained_request_keeps_its_grammar_state(
        tight_server: RunningServer) -> None:
    """The sampler (with the grammar's position in the document) travels with the job: a
    rebuilt one would restart the document in the middle of the string.

    Whether the late request is admitted beside the three streams (and then preempted as
    the newest) or waits for room depends on how far they got meanwhile: the scenario is
    run until it was preempted (at most 3 times), and every answer must be valid."""
    preempted = 0
    for _ in range(3):
        request = {"messages": [{"role": "user", "content": "A story, please."}],
                   "temperature": 1.0, "seed": 5, "max_tokens": WANT,
                   "response_format": {"type": "json_schema", "json_schema": {
                       "name": "story", "schema": STORY, "strict": True}}}
        reply = after_three_streams(tight_server, lambda request=request: httpx.post(
            f"{tight_server.api}/chat/completions", json=request, timeout=120).json())
        assert reply["choices"][0]["finish_reason"] == "stop", reply
        story = json.loads(reply["choices"][0]["message"]["content"])["story"]
        assert len(story) == 2 and all(200 <= len(part) <= 256 for part in story)
        preempted = reply.get("timings", {}).get("preemptions", 0)
        if preempted:
            break
    assert preempted >= 1, "the constrained request was never preempted"


def test_n_choices_whose_copies_overflow_the_cache_each_get_all_their_tokens(
        tight_server: RunningServer) -> None:
    """n = 3 x (prompt + 300) cannot share 512 cells: the prompt is evaluated once and
    copied, then the choice admitted last steps aside and resumes like any other job."""
    before = preemptions_total(tight_server)
    reply = httpx.post(f"{tight_server.api}/chat/completions", timeout=300,
                       json=body("Tell three stories.", n=3)).json()
    assert [c["finish_reason"] for c in reply["choices"]] == ["length"] * 3, reply
    assert reply["usage"]["completion_tokens"] == 3 * WANT
    assert preemptions_total(tight_server) > before
    log = tight_server.log()
    assert f"request {reply['id']}: prompt evaluated once for 3 choices" in log
    assert re.search(rf"request {reply['id']} preempted after \d+ tokens", log)
