"""Hostile connections on the real server: slow senders, a connection flood, pipelining
without reading, readers that stall. Raw sockets on 127.0.0.1, bounded loops, deadlines
shortened so that each case takes seconds.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import data_url, image_message, photo_bytes
from test_odd_paths import raw_post, requests_counted

from server.demo_model import DemoModelPaths

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0
WRITE_TIMEOUT = 2.0
MAX_CONNECTIONS = 48
SLOTS = 4
# With 20 top logprobs a token is ~2 KB of stream: the kernel takes the first ~3 MB of
# a reader that reads nothing, so a stream stalls after ~1,500 tokens, long before this.
STALL_TOKENS = 8000


@pytest.fixture(scope="module")
def guarded(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[RunningServer]:
    running = start_server(demo_model, tmp_path_factory.mktemp("connections") / "server.log",
                           "--n-parallel", str(SLOTS),
                           "--n-ctx", str(SLOTS * (STALL_TOKENS + 100)),
                           env={"VLSERVE_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
                                "VLSERVE_BODY_TIMEOUT": str(BODY_TIMEOUT),
                                "VLSERVE_WRITE_TIMEOUT": str(WRITE_TIMEOUT),
                                "VLSERVE_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
                                "VLSERVE_MAX_TOKENS_CAP": str(STALL_TOKENS),
                                "VLSERVE_WARMUP": "false"})
    yield running
    stop_server(running)


def port_of(server: RunningServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def connect(server: RunningServer, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connecting, so that the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port_of(server)))
    return sock


def rss_mib(server: RunningServer) -> float:
    with open(f"/proc/{server.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def request_lines(server: RunningServer) -> list[dict]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def wait_for(check, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


class Trickle:
    """A request sent one byte per `interval` after `opening`; notes when the server closes.

    Sending stops shortly before `deadline`: a byte sent after the server has answered and
    closed draws a reset that can discard the answer before it is read."""

    def __init__(self, server: RunningServer, opening: bytes, drip: bytes,
                 deadline: float) -> None:
        self.sock = connect(server)
        self.sock.sendall(opening)
        self.started = time.monotonic()
        self.drip = drip
        self.send_until = deadline - 0.5
        self.sent_at = self.started
        self.closed_after: float | None = None
        self.answer = b""

    def step(self) -> None:
        """Whatever came back, and a byte out once a second (until near the deadline)."""
        if self.closed_after is not None:
            return
        try:
            self._read()
            now = time.monotonic()
            if now - self.sent_at >= 1.0 and now - self.started < self.send_until:
                self.sock.send(self.drip)
                self.sent_at = now
            self._read()
        except OSError:
            self.closed_after = time.monotonic() - self.started
            self.sock.close()

    def _read(self) -> None:
        while select.select([self.sock], [], [], 0)[0]:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError
            self.answer += data


def test_slow_senders_are_closed_at_their_deadline(guarded: RunningServer) -> None:
    """A head, a chat body and an upload body, each sent at a byte a second: all closed by
    their deadline (408 JSON for the head), where without one they stayed open for good."""
    chat = (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-ID: slow-body\r\n"
            b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"messages\": ")
    upload = (b"POST /api/v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n"
              b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
    head = Trickle(guarded, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"a",
                   HEADER_TIMEOUT)
    bodies = [Trickle(guarded, chat, b" ", BODY_TIMEOUT),
              Trickle(guarded, upload, b"x", BODY_TIMEOUT)]
    for _ in range(60):  # 15 s, well past every deadline
        for trickle in (head, *bodies):
            trickle.step()
        if all(t.closed_after is not None for t in (head, *bodies)):
            break
        time.sleep(0.25)
    margin = 4.0  # a loaded machine; the deadlines themselves are 2 and 3 s
    assert head.closed_after is not None and head.closed_after < HEADER_TIMEOUT + margin
    status_line, _, rest = head.answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout", head.answer[:200]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    for body in bodies:
        assert body.closed_after is not None and body.closed_after < BODY_TIMEOUT + margin
        assert body.closed_after > BODY_TIMEOUT - 0.5  # the deadline, not an early cut
    log = guarded.log()
    assert "within 2 s (header_timeout): connection closed" in log
    assert log.count("incomplete after 3 s (body_timeout): connection closed") >= 2
    # The chat request is logged and counted, as what it was: too slow, not a success.
    wait_for(lambda: any(x.get("request_id") == "slow-body" for x in request_lines(guarded)))
    line = next(x for x in request_lines(guarded) if x.get("request_id") == "slow-body")
    assert line["status"] == 408 and line["finish_reason"] is None
    assert httpx.get(f"{guarded.url}/health", timeout=10).status_code == 200


def test_connections_past_the_cap_get_503(guarded: RunningServer) -> None:
    held = [connect(guarded) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # accepted (they are closed at the header deadline, 2 s)
        answer = _answer_of(connect(guarded))
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] \
            == "too_many_connections"
    finally:
        for sock in held:
            sock.close()
    # Once they are gone, a new connection is served again.
    wait_for(lambda: httpx.get(f"{guarded.url}/health", timeout=10).status_code == 200)
    assert "connection(s) refused" in guarded.log()


def _answer_of(sock: socket.socket) -> bytes:
    """What the server says to a new connection that has sent nothing (within 1 s)."""
    with sock:
        sock.settimeout(1.0)
        try:
            return sock.recv(65536)
        except TimeoutError:
            return b""


PIPELINED = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 60_000  # 2 MB, never read


def pipeline_without_reading(server: RunningServer, sent: list[int],
                             release: threading.Event) -> None:
    """Send PIPELINED on a socket with a 4 KB receive buffer, reading nothing, until the
    server stops taking it (2 s without progress) or closes the connection; then hold the
    connection open until `release`."""
    sock = connect(server, rcvbuf=4096)
    sock.setblocking(False)
    offset = 0
    try:
        while offset < len(PIPELINED):
            if not select.select([], [sock], [], 2.0)[1]:
                break  # the server stopped reading
            offset += sock.send(PIPELINED[offset:offset + 65536])
    except OSError:
        pass  # closed by the server (write_timeout)
    finally:
        sent.append(offset)
        release.wait(60)
        sock.close()


def chat_seconds(server: RunningServer) -> float:
    started = time.monotonic()
    answer = httpx.post(f"{server.api}/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    return time.monotonic() - started


def test_pipelined_requests_are_all_answered_in_order(guarded: RunningServer) -> None:
    """Far more requests pipelined than are parsed ahead: held back, not lost."""
    sock = connect(guarded)
    with sock:
        sock.sendall(b"".join(b"GET /health?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % n
                              for n in range(300))
                     + b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 200 OK") == 301
    assert received.rstrip().endswith(b"}]}") and b'"object":"list"' in received


def test_pipelining_without_reading_is_bounded(guarded: RunningServer) -> None:
    """Four sockets pipelining 60,000 x GET /health each and never reading: the server
    parses a bounded number ahead (uvicorn alone queued all of them: +115 MiB a socket),
    a concurrent chat stays fast, and the closed connections leave no tracebacks."""
    baseline = min(chat_seconds(guarded) for _ in range(3))
    before = rss_mib(guarded)
    sent: list[int] = []
    release = threading.Event()
    senders = [threading.Thread(target=pipeline_without_reading, args=(guarded, sent, release))
               for _ in range(4)]
    for sender in senders:
        sender.start()
    peak, during = before, 0.0
    try:
        for _ in range(8):
            time.sleep(0.5)
            peak = max(peak, rss_mib(guarded))
        during = chat_seconds(guarded)
        peak = max(peak, rss_mib(guarded))
    finally:
        release.set()
        for sender in senders:
            sender.join(60)
    assert peak - before < 40, (before, peak, sent)  # MiB
    assert during < baseline + 2.0, (baseline, during)
    wait_for(lambda: httpx.get(f"{guarded.url}/health", timeout=10).status_code == 200)
    log = guarded.log()
    assert "Traceback" not in log and "unable to perform operation" not in log, log[-3000:]


def test_closing_under_pipelined_chats_is_quiet(guarded: RunningServer) -> None:
    """Chats pipelined without reading, then the connection closed (cleanly, or with a
    reset): no traceback (uvicorn marked only the last request parsed as disconnected, so
    the running one went on to use a closed transport: "unable to perform operation")."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    chat = (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body.encode()))
    socks = [connect(guarded, rcvbuf=4096) for _ in range(4)]
    for sock in socks:
        sock.setblocking(False)
        try:
            sock.send(chat * 3000)  # as much as the buffers take
        except BlockingIOError:
            pass
    time.sleep(1.0)
    for n, sock in enumerate(socks):
        if n % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        sock.close()
    time.sleep(2.0)  # what a closed connection's requests do next, they do by now
    assert httpx.get(f"{guarded.url}/health", timeout=10).status_code == 200
    log = guarded.log()
    assert "Traceback" not in log and "unable to perform operation" not in log, log[-3000:]


class HealthProbe:
    """GET /health every 50 ms in a thread; the slowest answer is how long the event loop
    was blocked (at most)."""

    def __init__(self, server: RunningServer) -> None:
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(server.url,), daemon=True)
        self._thread.start()

    def _run(self, url: str) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                assert client.get(f"{url}/health").status_code == 200
                self.slowest = max(self.slowest, time.monotonic() - started)
                time.sleep(0.05)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(30)
        return self.slowest


def stalled_stream(server: RunningServer, request_id: str) -> socket.socket:
    """A stream request (big chunks: 20 top logprobs a token) whose client reads nothing."""
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a story."}],
                       "stream": True, "max_tokens": STALL_TOKENS, "ignore_eos": True,
                       "logprobs": True, "top_logprobs": 20}).encode()
    sock = connect(server, rcvbuf=4096)
    sock.sendall(b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nX-Request-ID: " + request_id.encode()
                 + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def test_stalled_stream_readers_are_cut_and_logged_499(guarded: RunningServer) -> None:
    """Streams whose clients read nothing are cut after write_timeout: cancelled in the
    engine, logged and counted 499 (never `200 length`), and cutting them all at once
    leaves /health answering promptly."""
    ids = [f"stall-{n}" for n in range(SLOTS)]
    probe = HealthProbe(guarded)
    socks = [stalled_stream(guarded, request_id) for request_id in ids]
    try:
        wait_for(lambda: {x.get("request_id") for x in request_lines(guarded)} >= set(ids),
                 timeout=90)
    finally:
        slowest = probe.stop()
        for sock in socks:
            sock.close()
    lines = {x["request_id"]: x for x in request_lines(guarded) if x.get("request_id") in ids}
    assert {(x["status"], x["finish_reason"]) for x in lines.values()} == {(499, None)}
    log = guarded.log()
    assert "read nothing for 2 s (write_timeout): connection closed" in log
    # Cut mid-generation: the engine stopped each of them (and dropped what it held).
    assert all(f"request {i} cancelled (client gone)" in log for i in ids), log[-3000:]
    assert slowest < 1.0, slowest  # closing them all at once did not block the loop
    slots = httpx.get(f"{guarded.api}/slots", timeout=10).json()
    assert slots["busy_slots"] == 0 and slots["queue_depth"] == 0, slots
    metrics = httpx.get(f"{guarded.url}/metrics", timeout=10).text
    assert 'vlserve_requests_total{finish_reason="none",status="499"}' in metrics


def test_a_slow_but_steady_reader_is_not_cut(guarded: RunningServer) -> None:
    """A stream read at 16 KB/s, far slower than it is generated: the server's buffers
    fill and stay full, yet the reader makes progress, so write_timeout (2 s) never cuts
    it (the kernel's queue counts: it drains long before the kernel asks for more)."""
    sock = stalled_stream(guarded, "steady")
    port = sock.getsockname()[1]
    received, started = 0, time.monotonic()
    with sock:
        while time.monotonic() - started < 10:
            data = sock.recv(4096)
            assert data, f"cut after {time.monotonic() - started:.1f} s, {received} bytes"
            received += len(data)
            time.sleep(0.25)
    assert f"client at 127.0.0.1:{port} read nothing" not in guarded.log()
    wait_for(lambda: any(x.get("request_id") == "steady" for x in request_lines(guarded)))


def test_hang_ups_at_every_stage_are_499(guarded: RunningServer) -> None:
    """Clients that leave mid-generation: without streaming, with an image, and a stream
    after its first chunk. Each is a 499 with no finish reason, in the log and the metrics;
    those without streaming used to be `200 stop` (the answer went to a closed connection)."""
    long = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": STALL_TOKENS,
            "ignore_eos": True}
    image = {**long, "messages": [image_message("what?", data_url(photo_bytes(64, 48)))]}
    before = requests_counted(guarded, 499)
    for request_id, body in (("gone-text", long), ("gone-image", image)):
        # 0.3 s: admitted and generating (8,000 tokens take seconds), far from done.
        raw_post(guarded, "/api/v1/chat/completions", body, request_id, hang_up_after=0.3)
    stream = connect(guarded)
    data = json.dumps({**long, "stream": True}).encode()
    stream.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-ID: gone-stream"
                   b"\r\nContent-Type: application/json\r\nContent-Length: "
                   + str(len(data)).encode() + b"\r\n\r\n" + data)
    received = b""
    while b"data: " not in received:  # the first chunk
        chunk = stream.recv(65536)
        assert chunk, received
        received += chunk
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    stream.close()  # a reset
    ids = ("gone-text", "gone-image", "gone-stream")
    wait_for(lambda: {x.get("request_id") for x in request_lines(guarded)} >= set(ids))
    lines = [x for x in request_lines(guarded) if x.get("request_id") in ids]
    assert [(x["status"], x["finish_reason"]) for x in lines] == [(499, None)] * 3, lines
    assert requests_counted(guarded, 499) == before + 3
    log = guarded.log()
    assert all(f"request {i} cancelled (client gone)" in log for i in ids)
    assert "Traceback" not in log
