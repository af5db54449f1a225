"""Clients that hang up: every handler ends (queued, decoding images, generating), its body
is let go, and nothing is left "in flight" for the drain to wait on (issue 21, row 1).

Before, a request whose client left while it was queued was dropped by the engine without
an answer: its handler waited forever holding the body (11 x 10 MB hang-ups: +350 MB that
never came back), and SIGTERM waited the whole drain timeout for them.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import data_url, image_message, pattern_png

from server.demo_model import DemoModelPaths

BUSY_TOKENS = 2048
HANG_UPS = 10
BODY_BYTES = 4 * 1024 * 1024  # per hang-up, in a field the server ignores: it is queued


@pytest.fixture
def hangup_server(demo_model: DemoModelPaths, tmp_path: Path) -> Iterator[RunningServer]:
    # Room for both busy generations in the KV cache: none is cut short. Buffers of 1 MiB
    # and more are mmapped, so a body let go is gone from RSS at once and RSS shows what is
    # still held (ten leaked bodies: +40 MiB), not glibc's arena high-water marks (the
    # production configs set MALLOC_ARENA_MAX too).
    running = start_server(demo_model, tmp_path / "server.log", "--n-parallel", "2",
                           "--n-ctx", "8192",
                           env={"VLSERVE_MAX_TOKENS_CAP": str(BUSY_TOKENS),
                                "VLSERVE_DRAIN_TIMEOUT": "300", "MALLOC_ARENA_MAX": "2",
                                "MALLOC_MMAP_THRESHOLD_": str(1024 * 1024)})
    yield running
    stop_server(running)


def send_and_hang_up(server: RunningServer, body: bytes, after: float) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = ("POST /api/v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        sock.sendall(head.encode() + body)
        time.sleep(after)


def chat_statuses(server: RunningServer) -> list[int]:
    return [json.loads(line)["status"] for line in server.log().splitlines()
            if line.startswith("{") and '"chat_completion"' in line]


def rss_kib(server: RunningServer) -> int:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def slots(server: RunningServer) -> dict:
    return httpx.get(f"{server.api}/slots", timeout=10).json()


def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


class Keeper:
    """Keeps every slot busy with long generations until stopped."""

    def __init__(self, server: RunningServer, n: int) -> None:
        self._stop = threading.Event()
        self.done = 0
        body = {"messages": [{"role": "user", "content": "Go on."}], "temperature": 0,
                "max_tokens": BUSY_TOKENS, "ignore_eos": True}
        self._threads = [threading.Thread(target=self._run, args=(server, body), daemon=True)
                         for _ in range(n)]
        for thread in self._threads:
            thread.start()

    def _run(self, server: RunningServer, body: dict) -> None:
        while not self._stop.is_set():
            answer = httpx.post(f"{server.api}/chat/completions", json=body, timeout=300)
            assert answer.status_code == 200, answer.text
            self.done += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(300)


def sigterm_exits_without_waiting(server: RunningServer) -> None:
    server.process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert server.process.wait(timeout=60) == 0
    assert time.monotonic() - started < 30  # the drain timeout is 300 s
    assert "drained after" in server.log()


def hang_ups_behind_busy_slots(server: RunningServer, body: bytes, answered: int) -> None:
    """Keep both slots busy, hang up HANG_UPS requests while they queue; wait for the end."""
    keeper = Keeper(server, 2)
    wait_for(lambda: slots(server)["busy_slots"] == 2, 60, "slots never got busy")
    for _ in range(HANG_UPS):
        send_and_hang_up(server, body, 0.3)
    keeper.stop()
    wait_for(lambda: not slots(server)["busy_slots"] and not slots(server)["queue_depth"],
             60, "the engine never went idle")
    # Every hung-up request's handler ended, as a 499.
    wait_for(lambda: chat_statuses(server).count(499) == answered + HANG_UPS, 30,
             f"handlers still waiting: {chat_statuses(server)}")


def test_hang_ups_while_queued_end_their_handlers_and_free_their_bodies(
        hangup_server: RunningServer) -> None:
    server = hangup_server
    # Long, so that one slipping into a slot between two busy requests is still running
    # when its client leaves (and ends as a 499 too), not answered in full before.
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": BUSY_TOKENS, "ignore_eos": True,
                       "metadata_blob": "x" * BODY_BYTES}).encode()
    # A first round loads what a server loads once (allocator arenas, threads, buffers).
    hang_ups_behind_busy_slots(server, body, 0)
    assert "while queued" in server.log()  # the path under test was taken
    start_rss = rss_kib(server)
    # A second round leaves memory where the first did: a leak would keep its
    # HANG_UPS x 4 MiB bodies (+35 % of this RSS) and more.
    hang_ups_behind_busy_slots(server, body, HANG_UPS)
    grown = rss_kib(server) - start_rss
    print(f"RSS {start_rss} KiB after round 1, {grown:+d} KiB after round 2")
    assert grown < start_rss * 0.10, f"RSS grew {grown} KiB from {start_rss} KiB"
    sigterm_exits_without_waiting(server)


def test_hang_ups_during_image_decode_with_an_idle_engine_end_their_handlers(
        hangup_server: RunningServer) -> None:
    server = hangup_server
    image = pattern_png(1600, 1200)
    body = json.dumps({"messages": [image_message("What is it?", data_url(image))],
                       "max_tokens": 4}).encode()
    tries = 30
    for i in range(tries):
        send_and_hang_up(server, body, 0.01 * (i % 5))  # closes at several decode stages
    wait_for(lambda: len(chat_statuses(server)) == tries, 60,
             f"handlers still waiting: {len(chat_statuses(server))} of {tries} ended")
    assert set(chat_statuses(server)) <= {499, 200}
    assert slots(server)["busy_slots"] == 0 and slots(server)["queue_depth"] == 0
    sigterm_exits_without_waiting(server)
