"""`max_requests_per_key` on a real server with two API keys: a key at its limit gets a
429 (logged and counted as one) while the other key is served, and once one of its
requests has finished it is served again."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import metric_value

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
        counted = metric_value(server.url, "vlserve_requests_total",
                               'finish_reason="none",status="429"', key=KEY_B)
        assert counted >= 1
    # Its streams ended (hung up): its requests are its own again.
    assert chat(server, KEY_A).status_code == 200
