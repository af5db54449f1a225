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


def test_overlong_multipart_boundary_is_a_400_without_traceback(server: RunningServer) -> None:
    """python-multipart refuses boundaries over 256 characters as it builds its parser."""
    boundary = "b" * 300
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n").encode() \
        + photo_bytes(8, 8) + f"\r\n--{boundary}--\r\n".encode()
    logged = len(server.log())
    resp = httpx.post(f"{server.api}/files", content=body, timeout=30,
                      headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == {"message": "malformed multipart body",
                                    "type": "invalid_request_error", "param": None,
                                    "code": "invalid_upload"}
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    new_log = server.log()[logged:]
    assert "Traceback" not in new_log and "FormParserError" not in new_log


def _page(server: RunningServer, **params: object) -> httpx.Response:
    return httpx.get(f"{server.api}/files", params=params, timeout=10)


@pytest.mark.parametrize("order", ["desc", "asc"])
def test_file_pages_list_each_file_once_whatever_is_read_meanwhile(
        client: openai.OpenAI, server: RunningServer, order: str) -> None:
    """Ten uploads within a second used to tie on created_at (whole seconds) and fall back
    to the store's recently-used order, which every GET changed: pages skipped and
    repeated files. Now the order is creation to the microsecond, then id."""
    png = photo_bytes(16, 16)
    mine = [client.files.create(file=(f"{i}.png", io.BytesIO(png)), purpose="vision").id
            for i in range(10)]
    seen: list[str] = []
    after: str | None = None
    for _ in range(100):  # bounded: a cursor that cycles must fail, not hang
        params: dict[str, object] = {"limit": 4, "order": order}
        if after is not None:
            params["after"] = after
        resp = _page(server, **params)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        ids = [f["id"] for f in page["data"]]
        seen += ids
        for file_id in reversed(ids):  # reads in between must not move anything
            client.files.retrieve(file_id)
        if not page["has_more"]:
            break
        after = page["last_id"]
    else:
        pytest.fail(f"the listing never ended: {len(seen)} ids, {len(set(seen))} distinct")
    assert len(seen) == len(set(seen))
    assert [f for f in seen if f in mine] == (mine if order == "asc" else mine[::-1])
    for file_id in mine:
        client.files.delete(file_id)


def test_unknown_after_cursor_is_a_400_naming_it(server: RunningServer) -> None:
    resp = _page(server, after="file-gone", limit=4)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "after" and error["code"] == "invalid_cursor"
    assert "no file with id 'file-gone'" in error["message"]
