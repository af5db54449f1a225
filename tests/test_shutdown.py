"""Graceful shutdown on the real server process: SIGTERM drains, then exits 0.

Two kinds of in-flight request: a stream that is generating when SIGTERM arrives, and a
"held" request whose body the client sends only in part, which keeps the server draining
for exactly as long as the test wants, however fast or slow this machine generates.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import RunningServer, start_server

from server.demo_model import DemoModelPaths

# Greedy decoding of the demo model runs to max_tokens without sampling EOS.
STREAM_TOKENS = 600
STREAM = {"model": "m", "messages": [{"role": "user", "content": "Tell me a story."}],
          "temperature": 0, "max_tokens": STREAM_TOKENS, "stream": True,
          "stream_options": {"include_usage": True}}


class StreamReader:
    """Reads one SSE stream in a thread; records its events and how it ended."""

    def __init__(self, url: str) -> None:
        self.events: list[str] = []
        self.error: Exception | None = None
        self.first_token = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()

    def _run(self, url: str) -> None:
        try:
            with httpx.stream("POST", f"{url}/api/v1/chat/completions", json=STREAM,
                              timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line.removeprefix("data: "))
                    if len(self.events) >= 2:  # the role chunk, then a token
                        self.first_token.set()
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.first_token.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stream still running"

    def final(self) -> tuple[str | None, int | None]:
        """(finish_reason, usage.completion_tokens) as the stream reported them."""
        finish, tokens = None, None
        for event in self.events:
            if event == "[DONE]":
                continue
            chunk = json.loads(event)
            if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                finish = chunk["choices"][0]["finish_reason"]
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        return finish, tokens


class HeldRequest:
    """A chat request sent over a raw socket, its body cut short until `finish()`."""

    def __init__(self, server: RunningServer) -> None:
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                           "temperature": 0}).encode()
        port = int(server.url.rsplit(":", 1)[1])
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        head = ("POST /api/v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        self.sock.sendall(head.encode() + body[:5])
        self.rest = body[5:]

    def finish(self) -> bytes:
        """Send the rest of the body and read the response to the end of the connection."""
        self.sock.sendall(self.rest)
        return self.read_all()

    def read_all(self) -> bytes:
        chunks = []
        while chunk := self.sock.recv(65536):
            chunks.append(chunk)
        self.sock.close()
        return b"".join(chunks)


def start(demo_model: DemoModelPaths, tmp_path: Path, drain_timeout: float) -> RunningServer:
    return start_server(demo_model, tmp_path / "server.log", "--n-ctx", "2048",
                        env={"VLSERVE_MAX_TOKENS_CAP": str(STREAM_TOKENS),
                             "VLSERVE_DRAIN_TIMEOUT": str(drain_timeout)})


def wait_exit(server: RunningServer, timeout: float) -> int:
    try:
        return server.process.wait(timeout=timeout)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(
        demo_model: DemoModelPaths, tmp_path: Path) -> None:
    server = start(demo_model, tmp_path, drain_timeout=60)
    try:
        held = HeldRequest(server)
        stream = StreamReader(server.url)
        assert stream.first_token.wait(60) and stream.error is None
        server.process.send_signal(signal.SIGTERM)  # mid-stream
        time.sleep(0.5)  # let the signal land

        # Draining: the socket still accepts, and new work gets a clean 503.
        new = httpx.post(f"{server.api}/chat/completions", timeout=10,
                         json={"messages": [{"role": "user", "content": "hi"}]})
        assert new.status_code == 503, new.text
        assert new.json()["error"]["code"] == "server_shutting_down"
        assert new.headers["retry-after"] and new.headers["connection"] == "close"
        health = httpx.get(f"{server.url}/health", timeout=10)
        assert (health.status_code, health.json()) == (503, {"status": "draining"})

        # The stream that was generating at SIGTERM runs to its end.
        stream.join(timeout=120)
        assert stream.error is None
        assert stream.events[-1] == "[DONE]"
        assert stream.final() == ("length", STREAM_TOKENS)  # whole, not cut off
        time.sleep(0.5)
        assert server.process.poll() is None, "exited while a request was in flight"

        # The held request was accepted before SIGTERM: it is served, not refused.
        response = held.finish()
        assert response.startswith(b"HTTP/1.1 200"), response[:300]
        assert b'"finish_reason"' in response
        assert wait_exit(server, timeout=30) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
    with pytest.raises(httpx.ConnectError):  # after exit: nothing listens
        httpx.get(f"{server.url}/health", timeout=5)
    log = server.log()
    assert "draining 2 request(s) in flight" in log  # the stream was still running
    assert "drained after" in log


def test_idle_server_exits_0_at_once(demo_model: DemoModelPaths, tmp_path: Path) -> None:
    server = start(demo_model, tmp_path, drain_timeout=60)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert wait_exit(server, timeout=30) == 0
    assert time.monotonic() - started < 10  # no waiting for the drain timeout


def test_drain_timeout_cuts_what_is_left_and_still_exits_0(
        demo_model: DemoModelPaths, tmp_path: Path) -> None:
    server = start(demo_model, tmp_path, drain_timeout=1.0)
    held = HeldRequest(server)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert wait_exit(server, timeout=30) == 0
    assert 1.0 <= time.monotonic() - started < 15
    response = held.read_all()  # cut: a 503 OpenAI error rather than uvicorn's plain 500
    assert response.startswith(b"HTTP/1.1 503"), response[:300]
    assert b'"code":"server_shutting_down"' in response
    log = server.log()
    assert "drain timeout (1 s) passed with 1 request(s) in flight" in log
    assert "Traceback" not in log


def test_second_signal_stops_without_waiting(demo_model: DemoModelPaths,
                                             tmp_path: Path) -> None:
    server = start(demo_model, tmp_path, drain_timeout=600)
    held = HeldRequest(server)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert server.process.poll() is None  # draining, waiting for the held request
    server.process.send_signal(signal.SIGTERM)
    # Like plain uvicorn: the second signal ends it at once, and it dies of that signal.
    assert wait_exit(server, timeout=30) == -signal.SIGTERM
    assert held.read_all() == b""


def test_no_request_text_reaches_the_log_raw(demo_model: DemoModelPaths,
                                             tmp_path: Path) -> None:
    """A path with an encoded newline, its body held back past the drain timeout: the
    drain warning names it escaped, on one line, instead of writing the attacker's line."""
    server = start(demo_model, tmp_path, drain_timeout=1.0)
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /playground/static/x%0A2026-12-01%2000:00:00,000%20ERROR%20vlserve:"
                     b"%20FAKE%20LINE HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\"")
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        server.process.send_signal(signal.SIGTERM)
        assert wait_exit(server, timeout=30) == 0
    log = server.log()
    assert "drain timeout: answering 503 to POST /playground/static/x\\n2026-12-01 00:00:00," \
           "000 ERROR vlserve: FAKE LINE" in log
    assert not any(line.startswith("2026-12-01 00:00:00") for line in log.splitlines())
