"""Every chat request is logged and counted once, whatever its path spelling: a path that
is not exactly a route (a control character in it) is a 404, not served, yet logged and
counted like any chat request, with its X-Request-ID."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import pytest
from conftest import RunningServer
from test_request_log import request_lines


def raw_post(server: RunningServer, path: str, body: dict, request_id: str,
             hang_up_after: float | None = None) -> bytes:
    """POST `body` to `path` exactly as spelled: the answer, or b"" when hanging up (with a
    reset, as a killed client does) `hang_up_after` seconds after sending."""
    data = json.dumps(body).encode()
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     f"Content-Type: application/json\r\nX-Request-ID: {request_id}\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        if hang_up_after is not None:
            time.sleep(hang_up_after)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            return b""
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def requests_counted(server: RunningServer, status: int) -> float:
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(
        rf'^vlserve_requests_total{{finish_reason="[a-z]+",status="{status}"}} (\S+)$',
        metrics, re.MULTILINE))


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("path", ["/api/v1/chat/completions%0A", "/v1/chat/completions%0a",
                                  "/api/v1/chat/completions%0D%0A", "/v1/chat/completions%09"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_path_spelled_oddly_is_a_404_logged_once(server: RunningServer, path: str,
                                                   stream: bool) -> None:
    before = requests_counted(server, 404)
    request_id = f"odd-{abs(hash((path, stream)))}"
    answer = raw_post(server, path, {**CHAT, "stream": stream}, request_id)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404"), answer[:300]  # not served
    assert f"x-request-id: {request_id}".encode() in head.lower()
    assert json.loads(body)["error"]["message"] == "Not Found"
    [line] = request_lines(server, request_id)
    assert line["status"] == 404 and line["finish_reason"] is None
    assert "\n" not in json.dumps(line)  # the path as sent, JSON-escaped
    assert line["path"].startswith("/") and not line["path"].isprintable()
    assert requests_counted(server, 404) == before + 1
