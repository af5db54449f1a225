"""Faults: an engine error on one request (500, the engine serves on), a request the engine
cannot take (400, not a dead engine), and the engine loop dying (every request answered,
/health 503, exit 1 so that a supervisor restarts the server).

Faults no request can cause are planted by tests/faulty_server.py, which runs the real
server with one function replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, RunningServer, start_server, stop_server
from helpers import Stream, data_url, image_message, photo_bytes

from server.app import create_app
from server.config import load_settings
from server.demo_model import DemoModelPaths
from server.engine import Engine, EngineState
from server.engine.scheduler import Scheduler
from server.images import content_hash

FAULTY = (str(ROOT / "tests" / "faulty_server.py"),)
BAD_IMAGE = photo_bytes(50, 40, seed=99)
LONG = 3000  # tokens: keeps a stream going while the faults happen beside it


def long_chat(**extra: object) -> dict:
    return {"messages": [{"role": "user", "content": "Tell me everything."}],
            "temperature": 0, "max_tokens": LONG, **extra}


@pytest.fixture(scope="module")
def encode_fault_server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                        ) -> Iterator[RunningServer]:
    running = start_server(demo_model, tmp_path_factory.mktemp("encode_fault") / "server.log",
                           "--n-parallel", "2", "--n-ctx", "8192", launcher=FAULTY,
                           env={"VLSERVE_TEST_FAULT_ENCODE_HASH": content_hash(BAD_IMAGE),
                                "VLSERVE_MAX_TOKENS_CAP": str(LONG)})
    yield running
    stop_server(running)


def test_a_failing_image_encode_is_a_500_and_the_engine_serves_on(
        encode_fault_server: RunningServer) -> None:
    api = encode_fault_server.api
    beside = Stream(api, long_chat())
    beside.started.wait(60)
    bad = image_message("What is this?", data_url(BAD_IMAGE))
    answer = httpx.post(f"{api}/chat/completions", timeout=60,
                        json={"messages": [bad], "max_tokens": 4})
    assert answer.status_code == 500, answer.text
    error = answer.json()["error"]
    assert error == {"message": "the vision encoder failed on an image", "type": "server_error",
                     "param": None, "code": "image_failed"}
    streamed = httpx.post(f"{api}/chat/completions", timeout=60,
                          json={"messages": [bad], "max_tokens": 4, "stream": True})
    assert streamed.status_code == 500  # failed before its first token: a plain error
    assert streamed.json()["error"]["code"] == "image_failed"

    good = image_message("And this?", data_url(photo_bytes(50, 40, seed=1)))
    for messages in ([good], [{"role": "user", "content": "hi"}]):
        ok = httpx.post(f"{api}/chat/completions", timeout=60,
                        json={"messages": messages, "max_tokens": 4})
        assert ok.status_code == 200, ok.text
    beside.join()
    assert beside.error is None and beside.events[-1] == "[DONE]"
    assert httpx.get(f"{encode_fault_server.url}/health", timeout=30).status_code == 200
    assert "image failed in request" in encode_fault_server.log()


@pytest.mark.parametrize("content, param", [
    ("hi \ud800 there", "messages.0.content"),
    ([{"type": "text", "text": "\udfff"}], "messages.0.content.0.text"),
])
def test_lone_surrogates_are_a_400_not_a_dead_engine(server: RunningServer, content: object,
                                                     param: str) -> None:
    # JSON can carry "\ud800"; once it reached the tokenizer's utf-8 encode, the engine
    # thread died of it and took the server down (exit 1) for every client.
    body = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 2})
    answer = httpx.post(f"{server.api}/chat/completions", content=body, timeout=30,
                        headers={"content-type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    assert answer.json()["error"]["code"] == "invalid_text"
    ok = httpx.post(f"{server.api}/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_an_unexpected_error_preparing_a_request_is_its_own_500(
        demo_model: DemoModelPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    """Anything a request's content makes the tokenizer raise ends that request only."""
    from server.engine import mtmd

    tokenize = mtmd.tokenize_parts

    def picky(mctx: int, parts: list) -> mtmd.TokenizedPrompt:
        if any(isinstance(p, str) and "poison" in p for p in parts):
            raise ValueError("a bug in the tokenizer binding")
        return tokenize(mctx, parts)

    with in_process_engine(demo_model) as (app, engine, _):
        monkeypatch.setattr(mtmd, "tokenize_parts", picky)
        bad, good = asyncio.run(chats(app, "poison", "fine"))
        assert bad.status_code == 500 and bad.json()["error"]["code"] == "internal_error"
        assert good.status_code == 200
        assert engine.state is EngineState.READY


def test_engine_loop_failure_answers_everyone_and_reports_failed(
        demo_model: DemoModelPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, where /health can be asked at leisure: the CLI would exit at once."""
    step = Scheduler._step

    def crash_once_one_waits(self: Scheduler) -> None:
        # The first chat holds the only slot for ~1000 tokens; the crash comes once the
        # second is queued behind it, so that both paths (slot, queue) are exercised.
        if self.queue_depth > 0:
            raise RuntimeError("planted fault: the engine loop crashed")
        step(self)

    with in_process_engine(demo_model, max_tokens=1000) as (app, _, failures):
        monkeypatch.setattr(Scheduler, "_step", crash_once_one_waits)
        answers = asyncio.run(chats(app, "one", "two", max_tokens=1000))
        for answer in answers:
            assert answer.status_code == 500, answer.text
            assert answer.json()["error"]["code"] == "engine_failed"
        deadline = time.monotonic() + 30  # the clients are answered first, then on_failure
        while not failures and time.monotonic() < deadline:
            time.sleep(0.01)
        assert failures == [EngineState.FAILED]  # on_failure ran once: the CLI exits 1
        health = asyncio.run(get(app, "/health"))
        assert health.status_code == 503
        assert health.json() == {"status": "failed",
                                 "error": "planted fault: the engine loop crashed"}
        after = asyncio.run(chats(app, "three"))[0]
        assert after.status_code == 503 and after.json()["error"]["code"] == "model_not_ready"


@contextlib.contextmanager
def in_process_engine(demo_model: DemoModelPaths, max_tokens: int = 8, **overrides: object
                      ) -> Iterator[tuple[object, Engine, list[EngineState]]]:
    """A started engine and its app in this process (one slot), and the states in which
    its on_failure callback ran; stopped on exit."""
    settings = load_settings(None, model=demo_model.text, mmproj=demo_model.mmproj,
                             n_ctx=2048, n_parallel=1, max_tokens_cap=max_tokens,
                             default_max_tokens=8, n_threads=1, **overrides)
    failures: list[EngineState] = []
    engine = Engine(settings, on_failure=lambda: failures.append(engine.state))
    app = create_app(settings, engine)
    engine.start()
    try:
        deadline = time.monotonic() + 60
        while engine.state in (EngineState.LOADING, EngineState.WARMING):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert engine.state is EngineState.READY, engine.error
        yield app, engine, failures
    finally:
        engine.stop(timeout=30)


async def chats(app: object, *prompts: str, max_tokens: int = 4) -> list[httpx.Response]:
    """Chats sent together (one slot: the others wait in the queue)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
        return list(await asyncio.gather(*(
            c.post("/api/v1/chat/completions", json={
                "messages": [{"role": "user", "content": p}], "max_tokens": max_tokens,
                "temperature": 0})
            for p in prompts)))


async def get(app: object, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
        return await c.get(path)


@pytest.mark.slow
def test_engine_loop_crash_in_the_real_server_exits_1(demo_model: DemoModelPaths,
                                                      tmp_path: Path) -> None:
    """A stream in flight, the request that crashes the loop, one waiting in the queue: all
    three are answered (no client hangs), and the process exits 1 for its supervisor."""
    server = start_server(demo_model, tmp_path / "server.log", "--n-parallel", "2",
                          "--n-ctx", "8192", launcher=FAULTY,
                          env={"VLSERVE_TEST_FAULT_CRASH_ON": "crash-me",
                               "VLSERVE_MAX_TOKENS_CAP": str(LONG)})
    try:
        streaming = Stream(server.api, long_chat())
        streaming.started.wait(60)
        crasher = Stream(server.api, long_chat(), headers={"X-Request-ID": "crash-me"})
        crasher.started.wait(60)
        queued = httpx.post(f"{server.api}/chat/completions", json=long_chat(), timeout=120)
        assert queued.status_code == 500, queued.text
        assert queued.json()["error"]["code"] == "engine_failed"
        for stream in (streaming, crasher):
            stream.join()
            assert stream.status == 200 and stream.error is None
            last = stream.events[-1]
            assert isinstance(last, dict) and last["error"]["code"] == "engine_failed", last
        assert server.process.wait(timeout=60) == 1
        assert "exiting because the engine failed" in server.log()
    finally:
        if server.process.poll() is None:
            stop_server(server)
