"""Batch data does not pile up forever: files expire (OpenAI's `expires_after`, default 30
days for batch files), finished batches are forgotten after `batch_retention_s`, results
logs go once the output file holds them. The stores on disk and on a real Redis, and the
API end to end with the SDK on the real engine."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import photo_bytes
from openai.types import FileObject
from redis_server import RedisServer
from test_batches import jsonl, read_lines, request_line, wait_batch

from server.api.errors import APIError
from server.api.expiry import form_expiry
from server.batches.job import ended_at
from server.batches.redis_store import BatchStorage, RedisBatchStore
from server.batches.store import BatchStore
from server.demo_model import DemoModelPaths

# ---------- the stores: disk and Redis alike ----------


@pytest.fixture(params=["disk", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BatchStorage]:
    if request.param == "disk":
        yield BatchStore(tmp_path)
        return
    server: RedisServer = request.getfixturevalue("redis")
    shared = RedisBatchStore(server.url(3), "one")
    shared._client.flushdb()
    yield shared
    shared.close()


def batch_record(batch_id: str, status: str, ended: int | None) -> bytes:
    record = {"id": batch_id, "status": status, "created_at": 1, "_created_us": 1_000_000,
              "_owner": "me", "input_file_id": "file-0", "completed_at": ended}
    return json.dumps(record).encode()


def batch_exists(store: BatchStorage, batch_id: str) -> bool:
    if isinstance(store, RedisBatchStore):
        return store.load_batch(batch_id) is not None
    return (store.root / "batches" / f"{batch_id}.json").exists()


def test_expired_files_are_hidden_at_once_and_deleted_by_the_sweep(store: BatchStorage
                                                                   ) -> None:
    now = time.time()
    gone = store.add_file("a.jsonl", "batch", b"a", "me", ttl_s=-1)  # expired already
    kept = store.add_file("b.jsonl", "batch", b"b", "me")  # no expiry
    in_use = store.add_file("c.jsonl", "batch", b"c", "me", ttl_s=-1)
    later = store.add_file("d.jsonl", "batch", b"d", "me", ttl_s=3600)
    assert kept.expires_at is None
    assert later.expires_at == later.created_at + 3600
    assert store.get_file(gone.id, "me") is None  # past its time: not found, swept or not
    assert {f.id for f in store.list_files("me")} == {kept.id, later.id}
    assert store.file_bytes(gone.id) == b"a"  # a running batch may still read it

    swept = store.sweep(time.time(), None, keep={in_use.id})
    assert swept.files == [gone.id] and swept.batches == []
    with pytest.raises(FileNotFoundError):
        store.file_bytes(gone.id)
    assert store.file_bytes(in_use.id) == b"c"  # an unfinished batch's input stays
    assert store.file_bytes(later.id) == b"d"
    assert set(store.sweep(now + 7200, None, keep=set()).files) == {in_use.id, later.id}
    assert store.get_file(kept.id, "me") is not None
    assert store.sweep(now + 7200, None, keep=set()).files == []


def test_finished_batches_are_forgotten_after_their_retention(store: BatchStorage) -> None:
    now = int(time.time())
    store.save_batch("batch_old", batch_record("batch_old", "completed", now - 100), 1)
    store.save_batch("batch_new", batch_record("batch_new", "completed", now - 10), 1)
    store.save_batch("batch_run", batch_record("batch_run", "in_progress", None), 1)
    if isinstance(store, RedisBatchStore):  # appends are fenced by the batch's lease
        assert store.claim("batch_old", 60)
    store.append_result("batch_old", {"_i": 0})
    store.save_image("batch_old", {"id": "file-1"}, b"rgb")

    swept = store.sweep(now, 50, keep=set())
    assert swept.batches == ["batch_old"] and swept.files == []
    assert not batch_exists(store, "batch_old")
    assert batch_exists(store, "batch_new") and batch_exists(store, "batch_run")
    assert store.read_results("batch_old") == []
    assert list(store.load_images("batch_old")) == []
    if isinstance(store, RedisBatchStore):  # the owner's listing no longer names it
        assert {b["id"] for b in store.list_batches("me")} == {"batch_new", "batch_run"}
    assert store.sweep(now, None, keep=set()).batches == []  # None: kept forever


def test_ended_at_is_the_final_status_time() -> None:
    assert ended_at({"created_at": 5, "completed_at": None, "cancelled_at": 9}) == 9
    assert ended_at({"created_at": 5, "failed_at": 7}) == 7


@pytest.mark.parametrize(("fields", "param"), [
    ({"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"},
     "expires_after.anchor"),
    ({"expires_after[anchor]": "created_at"}, "expires_after.seconds"),
    ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "60"},
     "expires_after.seconds"),
    ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "1e4"},
     "expires_after.seconds"),
    ({"expires_after[seconds]": "3600"}, "expires_after.anchor"),
])
def test_a_bad_expiry_policy_is_a_400_naming_the_field(fields: dict[str, str], param: str
                                                       ) -> None:
    with pytest.raises(APIError) as caught:
        form_expiry(fields)
    assert (caught.value.status, caught.value.param) == (400, param)


def test_expiry_policy_fields() -> None:
    assert form_expiry({"purpose": "batch"}) is None
    assert form_expiry({"expires_after[anchor]": "created_at",
                        "expires_after[seconds]": "86400"}) == 86400


# ---------- the API, end to end ----------

TTL_S = 2  # batch files and finished batches, on the test server


@pytest.fixture(scope="module")
def server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RunningServer]:
    running = start_server(demo_model, tmp_path_factory.mktemp("expiry") / "server.log",
                           env={"VLSERVE_BATCH_FILE_TTL_S": str(TTL_S),
                                "VLSERVE_BATCH_RETENTION_S": str(TTL_S)})
    yield running
    stop_server(running)


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=60)


def file_status(server: RunningServer, file_id: str) -> int:
    return httpx.get(f"{server.api}/files/{file_id}", timeout=10).status_code


def wait_until(condition: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_upload_expiry_is_reported_and_a_bad_one_refused(client: openai.OpenAI,
                                                         server: RunningServer) -> None:
    data = jsonl([request_line("a", [{"role": "user", "content": "hi"}])])
    default = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    asked = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch",
                                expires_after={"anchor": "created_at", "seconds": 7200})
    FileObject.model_validate(httpx.get(f"{server.api}/files/{asked.id}", timeout=10).json())
    assert default.expires_at == default.created_at + TTL_S
    assert asked.expires_at == asked.created_at + 7200
    assert client.files.retrieve(asked.id).expires_at == asked.expires_at

    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 60})
    assert caught.value.body["param"] == "expires_after.seconds"  # type: ignore[index]

    image = client.files.create(file=("cat.png", io.BytesIO(photo_bytes())), purpose="vision")
    assert image.expires_at == image.created_at + 3600  # upload_ttl_s: the latest it is kept
    with pytest.raises(openai.BadRequestError) as caught:  # it could not be kept longer
        client.files.create(file=("cat.png", io.BytesIO(photo_bytes())), purpose="vision",
                            expires_after={"anchor": "created_at", "seconds": 7200})
    assert caught.value.body["code"] == "unsupported_parameter"  # type: ignore[index]

    wait_until(lambda: file_status(server, default.id) == 404, "the file did not expire")
    assert default.id not in {f.id for f in client.files.list()}
    assert file_status(server, asked.id) == 200


def test_a_finished_batch_and_its_files_go_on_time(client: openai.OpenAI,
                                                   server: RunningServer) -> None:
    lines = [request_line(f"q{i}", [{"role": "user", "content": f"Count {i}"}])
             for i in range(3)]
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))),
                                   purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                              completion_window="24h",
                              output_expires_after={"anchor": "created_at", "seconds": 10})
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", output_expires_after={
                                      "anchor": "created_at", "seconds": 7200})
    done = wait_batch(server, batch.id, {"completed", "failed"})
    assert done.status == "completed", done
    batch_dir = server.log_path.parent / "batches"
    assert not (batch_dir / "batches" / f"{batch.id}.results").exists()  # in the output now
    assert done.output_file_id is not None
    output = client.files.retrieve(done.output_file_id)
    assert output.expires_at == output.created_at + 7200

    def batch_gone() -> bool:
        return httpx.get(f"{server.api}/batches/{batch.id}", timeout=10).status_code == 404

    wait_until(batch_gone, "the finished batch was kept past its retention")
    assert not (batch_dir / "batches" / f"{batch.id}.json").exists()
    assert batch.id not in {b.id for b in client.batches.list()}
    wait_until(lambda: not (batch_dir / "files" / f"{uploaded.id}.data").exists(),
               "the expired input file stayed on disk")
    assert file_status(server, uploaded.id) == 404
    assert set(read_lines(client, done.output_file_id)) == {"q0", "q1", "q2"}
