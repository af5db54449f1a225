"""Request ids round-trip, each chat request writes one JSON log line, startup lines read."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from conftest import RunningServer
from helpers import data_url, image_message, photo_bytes

from server.api.observe import client_request_id
from server.timings import STAGES


def request_lines(server: RunningServer, request_id: str, timeout: float = 10.0) -> list[dict]:
    """The JSON log lines of one request (the line lands just after the response)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [json.loads(line) for line in server.log().splitlines()
                 if line.startswith("{") and request_id in line]
        found = [r for r in found if r.get("request_id") == request_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def post(server: RunningServer, body: dict, **headers: str | bytes) -> httpx.Response:
    return httpx.post(f"{server.api}/chat/completions", json=body, headers=headers, timeout=60)


def test_client_request_id_round_trips(server: RunningServer) -> None:
    body = {"messages": [image_message("who?", data_url(photo_bytes(seed=5)))], "max_tokens": 3}
    resp = post(server, body, **{"X-Request-ID": "trace-abc/123 ok"})
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == "trace-abc/123 ok"
    completion_id = resp.json()["id"]
    assert completion_id.startswith("chatcmpl-")
    [line] = request_lines(server, "trace-abc/123 ok")
    assert line["completion_id"] == completion_id
    assert line["event"] == "chat_completion" and line["logger"] == "vlserve.request"
    assert line["status"] == 200 and line["finish_reason"] in ("stop", "length")
    assert line["model"] == "vlserve-demo-llava"
    assert line["client"] == "127.0.0.1"
    assert line["images"] == 1 and line["image_cache_hits"] == 0
    assert line["stream"] is False
    assert line["level"] == "info" and line["ts"].endswith("Z")
    timings = resp.json()["timings"]
    assert line["timings"] == timings  # the same numbers as the response: written once
    assert set(STAGES) <= set(line["timings"])
    assert line["timings"]["image_tokens"] == 64


def test_without_a_client_id_the_completion_id_is_the_request_id(
        server: RunningServer) -> None:
    resp = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    completion_id = resp.json()["id"]
    assert resp.headers["x-request-id"] == completion_id
    [line] = request_lines(server, completion_id)
    assert "completion_id" not in line


@pytest.mark.parametrize("bad", ["x" * 129, b"caf\xe9", "tab\there", ""])
def test_unusable_client_ids_are_replaced(server: RunningServer, bad: str | bytes) -> None:
    resp = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                **{"X-Request-ID": bad})
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == resp.json()["id"]


def test_streams_and_errors_carry_the_id(server: RunningServer) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server.api}/chat/completions", json=body, timeout=30,
                      headers={"X-Request-ID": "stream-1"}) as resp:
        assert resp.headers["x-request-id"] == "stream-1"
        resp.read()
    [line] = request_lines(server, "stream-1")
    assert line["stream"] is True and line["status"] == 200 and line["finish_reason"]

    # Rejected before the route runs (schema validation): still an id, a line and a status.
    bad = post(server, {"messages": []}, **{"X-Request-ID": "bad-1"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "bad-1"
    [line] = request_lines(server, "bad-1")
    assert line["status"] == 400 and line["finish_reason"] is None


def test_startup_lines_are_readable(server: RunningServer) -> None:
    log = server.log()
    for needle in ("model ", "LLM layers run on CPU", "vision encoder runs on CPU", "ready: ",
                   "images decoded by Pillow", "warm-up done in", "llama.cpp system info:",
                   "metrics at /metrics"):
        line = next((x for x in log.splitlines() if needle in x), None)
        assert line is not None, needle
        assert not line.startswith("{"), line


@pytest.mark.parametrize(("raw", "expected"), [
    ("abc-123", "abc-123"),
    ("  padded  ", "padded"),
    ("a" * 128, "a" * 128),
    ("a" * 129, None),
    ("", None),
    ("new\nline", None),
    ("café", None),
    (None, None),
])
def test_client_request_id_validation(raw: str | None, expected: str | None) -> None:
    assert client_request_id(raw) == expected


def test_readable_lines_escape_what_a_request_could_carry() -> None:
    """Any message (uvicorn's, a library's) stays on its line: control characters from a
    request are escaped; the traceback of an exception still follows on its own lines."""
    import logging

    from server.logs import READABLE_FORMAT, ReadableFormatter, printable

    assert printable("/x\nERROR fake\r\x1b[2J") == "/x\\nERROR fake\\r\\x1b[2J"
    assert printable("/plain/é path") == "/plain/é path"
    formatter = ReadableFormatter(READABLE_FORMAT)
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "odd %s", ("/a\nFAKE",), None)
    assert formatter.format(record).endswith("t: odd /a\\nFAKE")
    try:
        raise ValueError("boom")
    except ValueError as exc:
        failed = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed\n", (),
                                   (type(exc), exc, exc.__traceback__))
    text = formatter.format(failed)
    assert "t: failed\nTraceback" in text and text.endswith("ValueError: boom")
