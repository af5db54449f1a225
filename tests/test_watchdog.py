"""A hung engine is noticed (issue 15, Build 2): a decode step or image encode that does not
return within engine_watchdog_s turns /health 503, answers every request, and the process
exits 1 for its supervisor. The stalls are planted; the engine and server are real."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import start_server, stop_server
from helpers import data_url, image_message, photo_bytes
from test_faults import FAULTY, chats, get, in_process_engine, long_chat

from server.demo_model import DemoModelPaths
from server.engine import EngineState, mtmd
from server.engine.batch import TokenBatch

WATCHDOG_S = 1.0


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at the end, so a planted stall lets its engine thread go."""
    event = threading.Event()
    yield event
    event.set()


def wait_for_failure(failures: list[EngineState]) -> None:
    deadline = time.monotonic() + 60
    while not failures and time.monotonic() < deadline:
        time.sleep(0.02)
    assert failures == [EngineState.FAILED]  # on_failure ran once: the CLI exits 1


def test_a_stalled_decode_step_turns_health_503_and_answers_everyone(
        demo_model: DemoModelPaths, monkeypatch: pytest.MonkeyPatch,
        release: threading.Event) -> None:
    decode = TokenBatch.decode

    def stall_when_two_run(self: TokenBatch, ctx: object) -> int:
        if self.n >= 1 and stalling.is_set():
            release.wait()
        return decode(self, ctx)  # type: ignore[arg-type]

    stalling = threading.Event()
    with in_process_engine(demo_model, max_tokens=8,
                           engine_watchdog_s=WATCHDOG_S) as (app, engine, failures):
        assert engine.watchdog.limit_s == WATCHDOG_S
        ok = asyncio_chats(app, "before")  # an ordinary step is nowhere near the limit
        assert ok[0].status_code == 200 and not failures
        monkeypatch.setattr(TokenBatch, "decode", stall_when_two_run)
        stalling.set()
        answers = asyncio_chats(app, "one", "two")  # one in the slot, one queued
        for answer in answers:
            assert answer.status_code == 500, answer.text
            assert answer.json()["error"]["code"] == "engine_hung"
        health = asyncio_get(app, "/health")
        assert health.status_code == 503
        assert health.json()["status"] == "failed"
        assert health.json()["error"].startswith(
            "the engine hung: a decode step had not returned after")
        wait_for_failure(failures)
        after = asyncio_chats(app, "three")[0]
        assert after.status_code == 503 and after.json()["error"]["code"] == "model_not_ready"


def test_a_stalled_image_encode_is_noticed_too(
        demo_model: DemoModelPaths, monkeypatch: pytest.MonkeyPatch,
        release: threading.Event) -> None:
    encode = mtmd.encode_image

    def stalled_encode(mctx: int, chunk: mtmd.PromptChunk) -> object:
        release.wait()
        return encode(mctx, chunk)

    with in_process_engine(demo_model, engine_watchdog_s=WATCHDOG_S) as (app, _, failures):
        monkeypatch.setattr(mtmd, "encode_image", stalled_encode)
        answer = asyncio_image_chat(app)
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "engine_hung"
        health = asyncio_get(app, "/health")
        assert health.status_code == 503
        assert "an image encode had not returned" in health.json()["error"]
        wait_for_failure(failures)


@pytest.mark.slow
def test_a_hung_real_server_exits_1(demo_model: DemoModelPaths, tmp_path: Path) -> None:
    """The real server, its decode wedged for good: the request in flight is told, and the
    process exits 1 although its engine thread never comes back."""
    server = start_server(demo_model, tmp_path / "server.log", "--n-parallel", "2",
                          launcher=FAULTY,
                          env={"VLSERVE_TEST_FAULT_STALL_ON": "stall-me",
                               "VLSERVE_ENGINE_WATCHDOG_S": str(WATCHDOG_S),
                               "VLSERVE_MAX_TOKENS_CAP": "3000"})
    try:
        stalled = httpx.post(f"{server.api}/chat/completions", json=long_chat(stream=False),
                             headers={"X-Request-ID": "stall-me"}, timeout=60)
        assert stalled.status_code == 500, stalled.text
        assert stalled.json()["error"]["code"] == "engine_hung"
        assert server.process.wait(timeout=60) == 1
        log = server.log()
        assert "engine hung: a decode step has not returned after" in log
        assert "exiting because the engine hung" in log
    finally:
        if server.process.poll() is None:
            stop_server(server)


def asyncio_chats(app: object, *prompts: str) -> list[httpx.Response]:
    """Bounded: without a watchdog, a stalled engine would leave these waiting for ever."""
    import asyncio

    return asyncio.run(asyncio.wait_for(chats(app, *prompts), 60))


def asyncio_get(app: object, path: str) -> httpx.Response:
    import asyncio

    return asyncio.run(get(app, path))


def asyncio_image_chat(app: object) -> httpx.Response:
    import asyncio

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                     timeout=60) as client:
            return await client.post("/api/v1/chat/completions", json={
                "messages": [image_message("What is it?", data_url(photo_bytes(64, 48)))],
                "max_tokens": 2})

    return asyncio.run(asyncio.wait_for(run(), 60))
