"""OpenAI Files API uploads: the SDK path, pre-encoding, referencing in chats, limits."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import openai
import pytest
from conftest import RunningServer
from helpers import data_url, image_message, photo_bytes


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=60)


def wait_processed(server: RunningServer, file_id: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = httpx.get(f"{server.api}/files/{file_id}", timeout=10).json()
        if state["status"] == "processed":
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.02)


def file_part(file_id: str) -> dict:
    return {"type": "file", "file": {"file_id": file_id}}


def test_sdk_upload_then_chat_skips_the_encoder(family_server: RunningServer) -> None:
    server = family_server  # pre-encoding runs the projector outside a chat: both families
    client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=60)
    png = photo_bytes(333, 222, seed=77)
    uploaded = client.files.create(file=("cat.png", io.BytesIO(png)), purpose="vision")
    assert uploaded.id.startswith("file-") and len(uploaded.id) == len("file-") + 32
    assert uploaded.object == "file" and uploaded.bytes == len(png)
    assert uploaded.filename == "cat.png" and uploaded.purpose == "vision"
    assert uploaded.created_at > 0
    wait_processed(server, uploaded.id)

    by_id = client.chat.completions.create(
        model="m", temperature=0, max_tokens=8,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                               file_part(uploaded.id)]}])
    timings = by_id.model_extra["timings"]
    assert timings["image_encode"] == 0 and timings["image_cache_hits"] == 1
    assert timings["image_decode"] == 0  # decoded once, at upload
    inline = client.chat.completions.create(
        model="m", temperature=0, max_tokens=8,
        messages=[image_message("What is it?", data_url(png))])
    assert inline.choices[0].message.content == by_id.choices[0].message.content


def test_list_get_delete(client: openai.OpenAI, server: RunningServer) -> None:
    uploaded = client.files.create(file=("a.jpg", io.BytesIO(photo_bytes(fmt="JPEG"))),
                                   purpose="vision")
    assert uploaded.id in {f.id for f in client.files.list()}
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert client.files.delete(uploaded.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_unknown_file_id_in_chat_is_400_naming_it(server: RunningServer) -> None:
    body = {"messages": [{"role": "user", "content": [file_part("file-doesnotexist")]}],
            "max_tokens": 2}
    resp = httpx.post(f"{server.api}/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert "file-doesnotexist" in error["message"]
    assert error["param"] == "messages.0.content.0.file.file_id"


@pytest.mark.parametrize("payload, status", [
    (b"not an image at all", 400),
    (b"", 400),
])
def test_bad_uploads(server: RunningServer, payload: bytes, status: int) -> None:
    resp = httpx.post(f"{server.api}/files", files={"file": ("x.png", payload)},
                      data={"purpose": "vision"}, timeout=30)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == "file"


def test_upload_without_multipart_is_400(server: RunningServer) -> None:
    resp = httpx.post(f"{server.api}/files", json={"file": "x"}, timeout=30)
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_upload"


def test_oversized_upload_is_413(server: RunningServer) -> None:
    big = b"\xff" * (21 * 1024 * 1024)
    resp = httpx.post(f"{server.api}/files", files={"file": ("big.jpg", big)}, timeout=60)
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "file_too_large"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_parallel_uploads_and_chats(server: RunningServer) -> None:
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.api, api_key="x", max_retries=0) as aio:
            async def one(i: int) -> str:
                png = photo_bytes(100 + i, 80, seed=100 + i)
                uploaded = await aio.files.create(file=(f"{i}.png", io.BytesIO(png)),
                                                  purpose="vision")
                reply = await aio.chat.completions.create(
                    model="m", max_tokens=4, temperature=0,
                    messages=[{"role": "user", "content": [
                        {"type": "text", "text": f"Image {i}?"}, file_part(uploaded.id)]}])
                return reply.choices[0].finish_reason
            return list(await asyncio.gather(*(one(i) for i in range(8))))

    assert set(asyncio.run(run())) <= {"stop", "length"}
