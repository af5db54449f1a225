"""Regressions for what the schema fuzzing found: answers that did not match the document."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import RunningServer
from helpers import photo_bytes

from server.api.protocol import ChatCompletion, ChatCompletionChunk


def test_405_lists_every_method_of_the_path(server: RunningServer) -> None:
    # GET and POST /files are two routes; Starlette's own Allow named only the first.
    answer = httpx.request("TRACE", f"{server.api}/files", timeout=30)
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET, POST"
    assert answer.json()["error"]["type"] == "invalid_request_error"
    one = httpx.request("PUT", f"{server.api}/files/file-x", timeout=30)
    assert one.status_code == 405 and one.headers["allow"] == "DELETE, GET"


def test_every_stream_chunk_is_a_complete_chunk(server: RunningServer) -> None:
    # Token chunks (formatted by hand, for speed) lacked "logprobs": null.
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.api}/chat/completions", json=body, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
        for choice in chunk["choices"]:
            assert set(choice) == {"index", "delta", "finish_reason", "logprobs"}


def test_a_completion_matches_its_model(server: RunningServer) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "logprobs": True, "top_logprobs": 2}
    answer = httpx.post(f"{server.api}/chat/completions", json=body, timeout=60)
    ChatCompletion.model_validate(answer.json())


@pytest.mark.parametrize("field, value", [
    ("stream", 1),  # was accepted as true
    ("logprobs", 0),
    ("max_tokens", "5"),
    ("max_tokens", 5.5),
    ("temperature", "0.5"),
    ("seed", True),
])
def test_wrongly_typed_fields_are_400(server: RunningServer, field: str, value: object
                                      ) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], field: value}
    answer = httpx.post(f"{server.api}/chat/completions", json=body, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == field


def test_whole_floats_are_integers(server: RunningServer) -> None:
    # JSON (and JSON Schema) has one number type: 3.0 is the integer 3.
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3.0,
            "temperature": 0}
    answer = httpx.post(f"{server.api}/chat/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] <= 3


def test_missing_body_says_so(server: RunningServer) -> None:
    answer = httpx.post(f"{server.api}/chat/completions", timeout=30)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "the request body is missing or empty"


def test_upload_part_named_file_needs_no_filename(server: RunningServer) -> None:
    # curl -F 'file=<cat.png' sends no filename; the documented field is "file".
    png = photo_bytes(40, 30)
    answer = httpx.post(f"{server.api}/files", files={"file": (None, png, "image/png")},
                        timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["filename"] == "upload" and answer.json()["bytes"] == len(png)
    httpx.delete(f"{server.api}/files/{answer.json()['id']}", timeout=30)
