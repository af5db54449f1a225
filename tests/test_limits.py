"""Request size limits on the real server: body (413), headers (431), JSON nesting (400).

A server with small limits, so that going over them costs little.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import photo_bytes

from server.demo_model import DemoModelPaths

MAX_BODY = 64 * 1024
MAX_HEADERS = 4096
MAX_DEPTH = 16


@pytest.fixture(scope="module")
def small(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[RunningServer]:
    running = start_server(demo_model, tmp_path_factory.mktemp("limits") / "server.log",
                           env={"VLSERVE_MAX_REQUEST_BYTES": str(MAX_BODY),
                                "VLSERVE_MAX_HEADER_BYTES": str(MAX_HEADERS),
                                "VLSERVE_MAX_JSON_DEPTH": str(MAX_DEPTH),
                                # Above the body limit: the body limit is what answers.
                                "VLSERVE_UPLOAD_MAX_BYTES": str(4 * MAX_BODY)})
    yield running
    stop_server(running)


def chat_body(**extra: object) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


def test_declared_oversized_body_is_413_unread(small: RunningServer) -> None:
    body = json.dumps(chat_body(user="x" * MAX_BODY)).encode()
    answer = httpx.post(f"{small.api}/chat/completions", content=body,
                        headers={"content-type": "application/json"}, timeout=30)
    assert_error(answer, 413, "request_too_large")


def test_streamed_oversized_body_is_413(small: RunningServer) -> None:
    # No Content-Length (chunked): the limit counts what arrives.
    def chunks() -> Iterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "hi"}], "user": "'
        for _ in range(8):
            yield b"x" * (MAX_BODY // 4)
        yield b'"}'

    answer = httpx.post(f"{small.api}/chat/completions", content=chunks(), timeout=30)
    assert_error(answer, 413, "request_too_large")


def test_oversized_non_json_bodies_are_413(small: RunningServer) -> None:
    big = photo_bytes(400, 300, fmt="BMP")  # uncompressed: several times MAX_BODY
    assert len(big) > 2 * MAX_BODY
    upload = httpx.post(f"{small.api}/files", files={"file": ("a.bmp", big)}, timeout=30)
    assert_error(upload, 413, "request_too_large")

    def form() -> Iterator[bytes]:  # chunked multipart to the JSON route
        yield b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n"
        for _ in range(8):
            yield b"y" * (MAX_BODY // 4)
        yield b"\r\n--b--\r\n"

    chat = httpx.post(f"{small.api}/chat/completions", content=form(), timeout=30,
                      headers={"content-type": "multipart/form-data; boundary=b"})
    assert_error(chat, 413, "request_too_large")


def test_bodies_within_the_limit_pass(small: RunningServer) -> None:
    answer = httpx.post(f"{small.api}/chat/completions", timeout=60,
                        json=chat_body(user="x" * (MAX_BODY // 2)))
    assert answer.status_code == 200, answer.text
    upload = httpx.post(f"{small.api}/files", files={"file": ("a.png", photo_bytes(64, 48))},
                        timeout=30)
    assert upload.status_code == 200, upload.text


def nested(depth: int) -> object:
    value: object = 1
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def test_json_nesting_limit(small: RunningServer) -> None:
    url = f"{small.api}/chat/completions"
    # An unknown field is ignored by the route, but still parsed: the limit covers it.
    deep = httpx.post(url, json=chat_body(extra=nested(MAX_DEPTH)), timeout=30)
    assert_error(deep, 400, "json_too_deep")
    assert str(MAX_DEPTH + 1) in deep.json()["error"]["message"]
    bomb = b'{"messages": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    assert_error(httpx.post(url, content=bomb, timeout=30), 400, "json_too_deep")
    fine = httpx.post(url, json=chat_body(extra=nested(MAX_DEPTH - 1)), timeout=60)
    assert fine.status_code == 200, fine.text
    # Brackets inside strings are text, not nesting.
    text = httpx.post(url, json=chat_body(user="[{" * 1000), timeout=60)
    assert text.status_code == 200, text.text


def raw_request(server: RunningServer, head: bytes, timeout: float = 30) -> bytes:
    return raw_exchange(server, head, timeout)[1]


def raw_exchange(server: RunningServer, head: bytes, timeout: float = 30) -> tuple[bool, bytes]:
    """(whether all of `head` went out, what came back) over one raw connection."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(head)
            sent_all = True
        except OSError:
            sent_all = False  # the server closed before it had read everything
        received = b""
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            received += data
    return sent_all, received


def test_oversized_headers_are_431_json(small: RunningServer) -> None:
    ok = raw_request(small, b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 2000
                     + b"\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200"), ok[:200]
    big = raw_request(small, b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 8000
                      + b"\r\n\r\n")
    head, _, body = big.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), big[:200]
    assert json.loads(body)["error"]["code"] == "headers_too_large"
    # Many small headers count too, and so does the request line.
    many = raw_request(small, b"GET /health HTTP/1.1\r\n" + b"X-B: bbbbbbbbbb\r\n" * 400
                       + b"\r\n")
    assert many.startswith(b"HTTP/1.1 431"), many[:200]
    long_url = raw_request(small, b"GET /health?" + b"q" * 8000 + b" HTTP/1.1\r\n\r\n")
    assert long_url.startswith(b"HTTP/1.1 431"), long_url[:200]


def test_a_huge_header_is_cut_off_early(small: RunningServer) -> None:
    """64 MB of header: refused after the first few KB, the connection closed, the server
    unharmed (uvicorn's httptools parser alone would buffer all of it)."""
    sent_all, answer = raw_exchange(small, b"GET /health HTTP/1.1\r\nX-A: " + b"a" * (64 << 20))
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert not sent_all  # far more than socket buffers hold: the server stopped reading
    assert httpx.get(f"{small.url}/health", timeout=30).status_code == 200


def test_limits_answers_are_logged(small: RunningServer) -> None:
    body = json.dumps(chat_body(user="x" * MAX_BODY)).encode()
    httpx.post(f"{small.api}/chat/completions", content=body, timeout=30,
               headers={"content-type": "application/json", "X-Request-ID": "too-big-1"})
    deadline = time.monotonic() + 30  # the line is written just after the answer
    while time.monotonic() < deadline:
        lines = [json.loads(x) for x in small.log().splitlines() if x.startswith("{")]
        if any(x.get("request_id") == "too-big-1" for x in lines):
            break
        time.sleep(0.05)
    assert any(x.get("request_id") == "too-big-1" and x["status"] == 413 for x in lines)


def test_the_limit_holds_for_each_request_of_a_connection(small: RunningServer) -> None:
    first = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    second = b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 8000 + b"\r\n\r\n"
    answers = raw_request(small, first + second)
    assert answers.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 431" in answers, answers[:400]


def test_without_httptools_h11_gets_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from server.http_protocol import ConnectionLimits, protocol_options

    limits = ConnectionLimits(max_header_bytes=5000, max_connections=7)
    assert protocol_options(limits)["http"].limits.max_header_bytes == 5000
    monkeypatch.setitem(sys.modules, "httptools", None)  # import fails
    assert protocol_options(limits) == {"http": "h11", "h11_max_incomplete_event_size": 5000,
                                        "limit_concurrency": 7}


def test_a_client_that_leaves_mid_body_is_a_499(small: RunningServer) -> None:
    port = int(small.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n"
                     b"X-Request-ID: left-early\r\n\r\n" + b'{"messages": [')
    deadline = time.monotonic() + 30
    statuses: list[int] = []
    while not statuses and time.monotonic() < deadline:
        statuses = [json.loads(x)["status"] for x in small.log().splitlines()
                    if x.startswith("{") and '"left-early"' in x]
        time.sleep(0.05)
    assert statuses == [499]
