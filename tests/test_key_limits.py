"""`max_requests_per_key` on a real server with two API keys: a key at its limit gets a
429 (logged and counted as one) while the other key is served, and once one of its
requests has finished it is served again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import metric_value
from starlette.types import Message, Receive, Scope, Send

from server.api.auth import set_identity
from server.api.key_limits import KeyConcurrency
from server.demo_model import DemoModelPaths

KEY_A, KEY_B = "sk-limited-a", "sk-limited-b"
LONG = 3000  # tokens: a stream that holds its place while the test goes on


@pytest.fixture(scope="module")
def limited(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[RunningServer]:
    server = start_server(demo_model, tmp_path_factory.mktemp("limited") / "server.log",
                          "--n-ctx", "4096",
                          env={"VLSERVE_API_KEYS": f"{KEY_A},{KEY_B}",
                               "VLSERVE_MAX_REQUESTS_PER_KEY": "2",
                               "VLSERVE_MAX_TOKENS_CAP": str(LONG)})
    yield server
    stop_server(server)


def chat(server: RunningServer, key: str) -> httpx.Response:
    return httpx.post(f"{server.api}/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {key}"},
                      json={"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2})


def test_a_key_at_its_limit_waits_its_turn_and_others_are_served(
        limited: RunningServer) -> None:
    server = limited
    body = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": LONG,
            "temperature": 0, "stream": True}
    with ExitStack() as streams:
        for _ in range(2):
            stream = streams.enter_context(httpx.stream(
                "POST", f"{server.api}/chat/completions", json=body, timeout=60,
                headers={"Authorization": f"Bearer {KEY_A}"}))
            lines = stream.iter_lines()
            streams.callback(lambda lines=lines: None)  # the iterator kept: the stream too
            assert next(lines).startswith("data: ")
        refused = chat(server, KEY_A)
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == "too_many_requests_per_key" and "2 requests" in error["message"]
        assert refused.headers["Retry-After"] == "1"
        assert refused.headers["X-Request-ID"]  # logged as a request
        assert chat(server, KEY_B).status_code == 200  # the other key is not held back
        slots = httpx.get(f"{server.api}/slots", timeout=10,
                          headers={"Authorization": f"Bearer {KEY_B}"}).json()
        assert slots["busy_slots"] >= 2, "A's streams ended before the checks were done"
        counted = metric_value(server.url, "vlserve_requests_total",
                               'finish_reason="none",status="429"', key=KEY_B)
        assert counted >= 1
    # Its streams ended (hung up): its requests are its own again.
    assert chat(server, KEY_A).status_code == 200


def test_the_count_follows_each_request_to_its_end() -> None:
    """KeyConcurrency alone, over an app that holds requests until told: the third of a
    key is refused, another key's passes, a finished one frees its place, and no count is
    left behind for a key with nothing in flight."""
    release = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    limited = KeyConcurrency(app, 2, frozenset({"/v1/chat/completions"}))

    async def call(client: str, method: str = "POST", path: str = "/v1/chat/completions"
                   ) -> int:
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "headers": []}
        set_identity(scope, client)
        await limited(scope, _no_body, send)
        return sent[0]["status"]

    async def go() -> None:
        held = [asyncio.create_task(call("a")) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert limited.in_flight == {"a": 2}
        assert await call("a") == 429
        other = asyncio.create_task(call("b"))
        listing = asyncio.create_task(call("a", method="GET"))  # not a generation
        await asyncio.sleep(0.01)
        assert limited.in_flight == {"a": 2, "b": 1}
        release.set()
        assert await asyncio.gather(*held, other, listing) == [200, 200, 200, 200]
        assert limited.in_flight == {}  # nothing left behind
        assert await call("a") == 200

    asyncio.run(go())


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}
