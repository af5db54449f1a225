"""Pages of stored chat completions cost the event loop little, whatever their size.

A page used to be built as Python objects and JSON-encoded on the event loop (and, from
Redis, every stored head decoded there first): a messages page holding ~40 MB of data-URL
images, or a listing of logprob-heavy completions, held every other client's stream for
as long as that took. Now each stored part is kept as the JSON it was encoded to once,
when stored, and a page is those bytes spliced together and sent in slices
(server.api.json_pages). Each test fetches pages from another process while a stream
runs, and bounds that stream's largest gap as tests/test_engine_stall.py does.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import RunningServer
from helpers import data_url, image_message
from openai.pagination import SyncCursorPage
from openai.types.chat import ChatCompletion
from redis_server import server_on_store
from test_engine_stall import MAX_GAP_S, Watch
from test_stored_chat import MESSAGES, noise_png

from server.api.chat_store import CHAT_CODEC, stored_chat, stored_messages
from server.api.json_pages import lines, list_parts, slices
from server.api.protocol import ChatMessageIn
from server.demo_model import DemoModelPaths

IMAGES = 5  # one per user message: ~7.5 MB of data URL each, ~38 MB in the messages page
IMAGE_SIDE = 1400
HEAVY = 10  # completions with 20 top logprobs on each of their tokens: ~1 MB of JSON each
HEAVY_TOKENS = 900


@pytest.fixture(scope="module", params=["memory", "redis"])
def pages_server(request: pytest.FixtureRequest, demo_model: DemoModelPaths,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    logs = tmp_path_factory.mktemp(f"stored-pages-{request.param}")
    env = {"VLSERVE_MAX_TOKENS_CAP": "3000", "VLSERVE_CHAT_COMPLETIONS_STORE_MB": "512"}
    with server_on_store(request.param, demo_model, logs, "--n-parallel", "2",
                         "--n-ctx", "4096", env=env) as (running, _):
        yield running


def create(server: RunningServer, **body: Any) -> dict[str, Any]:
    answer = httpx.post(f"{server.api}/chat/completions", timeout=300, json={
        "model": "m", "store": True, "temperature": 0, **body})
    assert answer.status_code == 200, answer.text
    return answer.json()


def fetched(server: RunningServer, path: str, tmp_path: Path) -> tuple[int, bytes]:
    """curl reads the page: reading tens of MB in this process would compete with the
    watching thread for the interpreter and blur what the server does."""
    out = tmp_path / "page.json"
    status = subprocess.run(
        ["curl", "-s", "-g", "-o", str(out), "-w", "%{http_code}", f"{server.api}{path}"],
        capture_output=True, timeout=120, check=True).stdout.decode()
    return int(status), out.read_bytes()


def watched(server: RunningServer, paths: list[str], tmp_path: Path
            ) -> tuple[float, list[tuple[int, bytes]]]:
    """The other stream's largest gap while `paths` are fetched one after another."""
    watch = Watch(server)
    assert watch.started.wait(60)
    time.sleep(0.2)
    started = time.perf_counter()
    pages = [fetched(server, path, tmp_path) for path in paths]
    took = time.perf_counter() - started
    time.sleep(0.3)
    gap = watch.largest_gap()
    print(f"{len(paths)} pages, {sum(len(body) for _, body in pages) / 1e6:.1f} MB in "
          f"{took:.2f} s; largest gap {gap * 1000:.0f} ms")
    return gap, pages


def test_a_page_of_large_images_does_not_stall_other_streams(
        pages_server: RunningServer, tmp_path: Path) -> None:
    urls = [data_url(noise_png(IMAGE_SIDE, seed)) for seed in range(IMAGES)]
    messages = [image_message(f"Picture {i}.", url) for i, url in enumerate(urls)]
    completion = create(pages_server, messages=messages, max_tokens=1)
    completion_id = completion["id"]
    path = f"/chat/completions/{completion_id}/messages"
    gap, pages = watched(pages_server, [f"{path}?limit=100", f"/chat/completions/"
                                        f"{completion_id}", f"{path}?limit=2&order=desc"],
                         tmp_path)
    (status, whole), (retrieved_status, retrieved), (last_status, newest) = pages
    assert (status, retrieved_status, last_status) == (200, 200, 200)
    page = MESSAGES.model_validate_json(whole)
    assert [m.id for m in page.data] == [f"{completion_id}-{i}" for i in range(IMAGES)]
    assert not page.has_more
    raw = json.loads(whole)
    assert (raw["first_id"], raw["last_id"]) == (f"{completion_id}-0",
                                                 f"{completion_id}-{IMAGES - 1}")
    assert [m["content_parts"] for m in raw["data"]] == [m["content"] for m in messages]
    assert [m["content"] for m in raw["data"]] == [f"Picture {i}." for i in range(IMAGES)]
    assert json.loads(retrieved) == {**completion, "metadata": {}}
    two = MESSAGES.model_validate_json(newest)
    assert [m.id for m in two.data] == [f"{completion_id}-{IMAGES - 1}",
                                        f"{completion_id}-{IMAGES - 2}"] and two.has_more
    assert gap < MAX_GAP_S, f"a stream stalled {gap * 1000:.0f} ms"


def test_a_listing_of_heavy_completions_does_not_stall_other_streams(
        pages_server: RunningServer, tmp_path: Path) -> None:
    run = f"heavy-{time.time_ns()}"
    made = [create(pages_server, messages=[{"role": "user", "content": f"Go on {i}."}],
                   max_tokens=HEAVY_TOKENS, ignore_eos=True, logprobs=True, top_logprobs=20,
                   metadata={"run": run})
            for i in range(HEAVY)]
    listing = f"/chat/completions?limit=100&metadata[run]={run}"
    gap, pages = watched(pages_server, [listing, f"{listing}&order=desc&limit=3"], tmp_path)
    (status, whole), (first_status, newest) = pages
    assert (status, first_status) == (200, 200)
    assert len(whole) > HEAVY * 500_000  # what makes it heavy: the logprobs
    page = SyncCursorPage[ChatCompletion].model_validate_json(whole)
    assert [c.id for c in page.data] == [c["id"] for c in made] and not page.has_more
    assert json.loads(whole)["data"] == [{**c, "metadata": {"run": run}} for c in made]
    three = json.loads(newest)
    assert [c["id"] for c in three["data"]] == [c["id"] for c in made[::-1][:3]]
    assert three["has_more"] and (three["first_id"], three["last_id"]) == (
        made[-1]["id"], made[-3]["id"])
    assert gap < MAX_GAP_S, f"a stream stalled {gap * 1000:.0f} ms"


# ---------- the pieces (no server) ----------

def test_a_record_reads_back_as_stored_in_either_format() -> None:
    completion = {"id": "chatcmpl-1", "object": "chat.completion", "created": 5,
                  "model": "m", "choices": [{"index": 0, "message": {"content": "é\n"}}]}
    messages = [ChatMessageIn(role="user", content="Hi.\nThere."),
                ChatMessageIn(role="user", content=[{"type": "text", "text": "\ud800"}])]
    entry = stored_chat(completion, "alice", {"k": "v"}, messages)
    listed = stored_messages("chatcmpl-1", messages)
    earlier = (json.dumps(["chatcmpl-1", "alice", 5, {"k": "v"}, completion, entry.size]
                          ).encode(), json.dumps(listed).encode())  # the previous version's
    for head, body in (CHAT_CODEC.encode(entry), earlier):
        back = CHAT_CODEC.decode(head, body)
        assert (back.id, back.owner, back.created, back.model, back.metadata, back.size) == (
            "chatcmpl-1", "alice", 5, "m", {"k": "v"}, entry.size)
        assert json.loads(b"".join(back.view())) == {**completion, "metadata": {"k": "v"}}
        assert back.messages is not None
        assert [json.loads(bytes(m)) for m in back.messages] == listed
        assert CHAT_CODEC.decode(head, None).messages is None
        # A record whose body was lost (evicted) stays a record through a metadata update:
        # written without a body (as "null" by the earlier version), its messages absent.
        lost = CHAT_CODEC.decode(head, None)
        head_again, body_again = CHAT_CODEC.encode(lost)
        assert body_again == b""
        assert CHAT_CODEC.decode(head_again, body_again or None).messages is None
    assert CHAT_CODEC.decode(earlier[0], b"null").messages is None


def test_a_page_is_its_parts_in_slices() -> None:
    parts: list[bytes | memoryview] = [b"ab", memoryview(b"0123456789")[2:9], b"", b"xyz"]
    assert list(slices(parts, 4)) == [b"ab23", b"4567", b"8xyz"]
    assert list(slices([b"x" * 8], 4)) == [b"xxxx", b"xxxx"]
    assert [bytes(line) for line in lines(b'{"a":1}\n{"b":2}')] == [b'{"a":1}', b'{"b":2}']
    page = list_parts([("a", [b'{"id":"a"}']), ("b", [b'{"id":"b"}'])], has_more=True)
    assert json.loads(b"".join(page)) == {"object": "list", "data": [{"id": "a"}, {"id": "b"}],
                                          "first_id": "a", "last_id": "b", "has_more": True}
    assert json.loads(b"".join(list_parts([], has_more=False))) == {
        "object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
