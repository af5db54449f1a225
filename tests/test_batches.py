"""Batch jobs (issue 19): the OpenAI Batch API end to end, with the openai SDK, on the real
engine and the tiny demo model; what is emitted is validated with the SDK's own types."""

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
from helpers import data_url, image_message, metric_value, photo_bytes
from openai.types import Batch, FileObject
from openai.types.chat import ChatCompletion

from server.demo_model import DemoModelPaths


@pytest.fixture(scope="module")
def batch_server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[RunningServer]:
    running = start_server(demo_model, tmp_path_factory.mktemp("batch") / "server.log",
                           "--n-parallel", "2", env={"VLSERVE_BATCH_MAX_LINES": "500"})
    yield running
    stop_server(running)


@pytest.fixture
def client(batch_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=batch_server.api, api_key="unused", max_retries=0,
                         timeout=60)


def request_line(custom_id: str, messages: list[dict], **body: object) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": messages, "temperature": 0, "max_tokens": 8,
                     **body}}


def jsonl(items: list[dict | str]) -> bytes:
    return "".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items).encode()


def upload_batch(client: openai.OpenAI, data: bytes) -> FileObject:
    return client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")


def create_batch(client: openai.OpenAI, lines: list[dict], window: str = "24h") -> Batch:
    """Upload `lines` as a batch input file and start a chat-completions batch on it."""
    uploaded = upload_batch(client, jsonl(lines))
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window=window)  # type: ignore[arg-type]


def raw_batch(server: RunningServer, batch_id: str) -> Batch:
    """GET /batches/{id} as the SDK's Batch type, validated (the SDK itself does not)."""
    answer = httpx.get(f"{server.api}/batches/{batch_id}", timeout=10)
    assert answer.status_code == 200, answer.text
    return Batch.model_validate(answer.json())


def wait_batch(server: RunningServer, batch_id: str, statuses: set[str],
               timeout: float = 120) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = raw_batch(server, batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)


def read_lines(client: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    """A batch output or error file, by custom_id (each may appear once only)."""
    assert file_id is not None
    items = [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    by_id = {item["custom_id"]: item for item in items}
    assert len(by_id) == len(items), "a custom_id appears twice"
    return by_id


def metric(server: RunningServer, name: str, labels: str) -> float:
    return metric_value(server.url, name, labels)


def test_batch_with_images_end_to_end(client: openai.OpenAI, batch_server: RunningServer
                                      ) -> None:
    png = photo_bytes(200, 150, seed=5)
    image = client.files.create(file=("cat.png", io.BytesIO(png)), purpose="vision")
    ask = "What is in the picture?"
    file_message = {"role": "user", "content": [{"type": "text", "text": ask},
                                                {"type": "file", "file": {"file_id": image.id}}]}
    data = jsonl([
        request_line("inline", [image_message(ask, data_url(png))]),
        request_line("by-file", [file_message]),
        request_line("text", [{"role": "user", "content": "Hello"}]),
        "{not json",
        request_line("bad-body", [{"role": "wizard", "content": "x"}]),
        {**request_line("bad-url", []), "url": "/v1/embeddings"},
    ])
    completed_before = metric(batch_server, "vlserve_batch_requests_total",
                              'state="completed"')

    uploaded = upload_batch(client, data)
    FileObject.model_validate(httpx.get(f"{batch_server.api}/files/{uploaded.id}").json())
    assert uploaded.purpose == "batch" and uploaded.bytes == len(data)
    assert client.files.content(uploaded.id).content == data  # stored byte for byte
    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h", metadata={"job": "photos"})
    assert created.status == "validating" and created.metadata == {"job": "photos"}

    done = wait_batch(batch_server, created.id, {"completed", "failed"})
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (6, 3, 3)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.expires_at == done.created_at + 24 * 3600

    outputs = read_lines(client, done.output_file_id)
    assert set(outputs) == {"inline", "by-file", "text"}
    answers = {}
    for custom_id, item in outputs.items():
        assert item["error"] is None and item["id"].startswith("batch_req_")
        assert item["response"]["status_code"] == 200
        answers[custom_id] = ChatCompletion.model_validate(item["response"]["body"])
    # The same image inline and by file id: the same greedy answer, an image in both prompts.
    assert answers["inline"].choices[0].message.content == \
        answers["by-file"].choices[0].message.content
    assert answers["inline"].model_extra["timings"]["image_tokens"] > 0
    assert answers["text"].model_extra["timings"]["image_tokens"] == 0

    errors = read_lines(client, done.error_file_id)
    assert set(errors) == {None, "bad-body", "bad-url"}
    assert errors[None]["response"] is None
    assert errors[None]["error"]["message"] == "the line is not valid JSON"
    assert "url must be the batch's endpoint" in errors["bad-url"]["error"]["message"]
    bad = errors["bad-body"]["response"]
    assert bad["status_code"] == 400 and "messages.0.role" in bad["body"]["error"]["message"]

    assert metric(batch_server, "vlserve_batch_requests_total",
                  'state="completed"') == completed_before + 3
    assert metric(batch_server, "vlserve_batches", 'status="completed"') >= 1
    listed = client.batches.list()
    assert created.id in [b.id for b in listed.data]
    assert f"batch {created.id} completed: 3 completed, 3 failed of 6" in batch_server.log()


def test_batch_file_limits_and_bad_requests(client: openai.OpenAI,
                                            batch_server: RunningServer) -> None:
    api = batch_server.api
    too_many = jsonl([request_line(f"r{i}", []) for i in range(501)])
    answer = httpx.post(f"{api}/files", data={"purpose": "batch"},
                        files={"file": ("x.jsonl", too_many)}, timeout=30)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_batch_file"
    assert "501 request lines; at most 500" in answer.json()["error"]["message"]

    image = client.files.create(file=("a.png", io.BytesIO(photo_bytes())), purpose="vision")
    for body, param in (
        ({"input_file_id": image.id, "endpoint": "/v1/chat/completions"}, "input_file_id"),
        ({"input_file_id": "file-0", "endpoint": "/v1/embeddings"}, "endpoint"),
        ({"input_file_id": image.id, "endpoint": "/v1/chat/completions",
          "completion_window": "soon"}, "completion_window"),
    ):
        answer = httpx.post(f"{api}/batches", json=body, timeout=10)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == param
    content = httpx.get(f"{api}/files/{image.id}/content", timeout=10)
    assert content.status_code == 400
    assert content.json()["error"]["code"] == "content_not_available"
    missing = httpx.get(f"{api}/batches/batch_nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "batch_not_found"

    # A custom_id used twice fails the whole batch at validation, as OpenAI's does.
    dup = upload_batch(client, jsonl([request_line("same", []), request_line("same", [])]))
    batch = client.batches.create(input_file_id=dup.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    failed = wait_batch(batch_server, batch.id, {"failed", "completed"})
    assert failed.status == "failed" and failed.failed_at and failed.errors is not None
    assert failed.errors.data and failed.errors.data[0].code == "duplicate_custom_id"
    assert failed.errors.data[0].line == 2


def test_cancel_keeps_finished_lines(client: openai.OpenAI, batch_server: RunningServer
                                     ) -> None:
    long = {"max_tokens": 40, "ignore_eos": True}
    # Enough lines that the batch is still running when the cancel comes, on a fast box too.
    data = jsonl([request_line(f"r{i}", [{"role": "user", "content": f"Count {i}"}], **long)
                  for i in range(400)])
    cancelled_before = metric(batch_server, "vlserve_batch_requests_total",
                              'state="cancelled"')
    batch = client.batches.create(input_file_id=upload_batch(client, data).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    wait_batch(batch_server, batch.id, {"in_progress"})
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_batch(batch_server, batch.id, {"cancelled", "completed"})
    assert done.status == "cancelled" and done.cancelling_at and done.cancelled_at
    counts = done.request_counts
    assert counts is not None and counts.total == 400 and counts.completed < 400
    finished = read_lines(client, done.output_file_id) if counts.completed else {}
    assert len(finished) == counts.completed
    assert all(item["response"]["body"]["usage"]["completion_tokens"] == 40
               for item in finished.values())  # nothing cut short is reported as done
    assert metric(batch_server, "vlserve_batch_requests_total", 'state="cancelled"') == \
        cancelled_before + 400 - counts.completed - counts.failed
    again = httpx.post(f"{batch_server.api}/batches/{batch.id}/cancel", timeout=10)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "batch_not_cancellable"
    assert again.json()["error"]["type"] == "invalid_request_error"


def test_batch_files_are_kept_on_disk(client: openai.OpenAI, batch_server: RunningServer
                                      ) -> None:
    data = jsonl([request_line("one", [{"role": "user", "content": "Hi"}])])
    uploaded = upload_batch(client, data)
    batch_dir = Path(batch_server.log_path.parent / "batches")
    assert (batch_dir / "files" / f"{uploaded.id}.data").read_bytes() == data
    assert uploaded.id in [f.id for f in client.files.list()]
    assert client.files.delete(uploaded.id).deleted
    assert not (batch_dir / "files" / f"{uploaded.id}.data").exists()
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_one_image_asked_several_questions_is_encoded_once(
        client: openai.OpenAI, batch_server: RunningServer) -> None:
    url = data_url(photo_bytes(180, 140, seed=31))  # an image no other test sends
    questions = ["What is it?", "What colour is it?", "Where is it?", "Is it big?"]
    data = jsonl([request_line(f"q{i}", [image_message(q, url)]) for i, q in
                  enumerate(questions)])
    batch = client.batches.create(input_file_id=upload_batch(client, data).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_batch(batch_server, batch.id, {"completed", "failed"})
    timings = [o["response"]["body"]["timings"]
               for o in read_lines(client, done.output_file_id).values()]
    assert len(timings) == 4
    assert sum(1 for t in timings if t["image_cache_hits"] == 0) == 1, timings
    assert sum(1 for t in timings if t["image_encode"] > 0) == 1, timings


def two_keys(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory,
             name: str) -> Iterator[RunningServer]:
    """A server with the keys key-a and key-b, for a module's fixture."""
    running = start_server(demo_model, tmp_path_factory.mktemp(name) / "server.log",
                           env={"VLSERVE_API_KEYS": "key-a,key-b"})
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def keyed_server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[RunningServer]:
    yield from two_keys(demo_model, tmp_path_factory, "batch-keys")


def test_batches_run_as_their_owner_and_only_the_owner_sees_them(
        keyed_server: RunningServer) -> None:
    """A line runs with its batch owner's identity (so it can name the owner's uploads);
    another key sees neither the batch nor its files."""
    owner = openai.OpenAI(base_url=keyed_server.api, api_key="key-a", max_retries=0)
    other = openai.OpenAI(base_url=keyed_server.api, api_key="key-b", max_retries=0)
    image = owner.files.create(file=("a.png", io.BytesIO(photo_bytes())), purpose="vision")
    file_message = {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                                {"type": "file", "file": {"file_id": image.id}}]}
    uploaded = upload_batch(owner, jsonl([request_line("mine", [file_message])]))
    batch = owner.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(uploaded.id)
    with pytest.raises(openai.BadRequestError, match="no batch file"):
        other.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    assert batch.id not in [b.id for b in other.batches.list().data]
    deadline = time.monotonic() + 60
    while (done := owner.batches.retrieve(batch.id)).status != "completed":
        assert time.monotonic() < deadline, done
        time.sleep(0.1)
    answer = read_lines(owner, done.output_file_id)["mine"]["response"]["body"]
    assert answer["timings"]["image_tokens"] > 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_server.api, api_key="nope",
                      max_retries=0).batches.list()


def test_listing_pages_newest_first(client: openai.OpenAI, batch_server: RunningServer) -> None:
    data = jsonl([request_line("one", [{"role": "user", "content": "Hi"}])])
    made = [client.batches.create(input_file_id=upload_batch(client, data).id,
                                  endpoint="/v1/chat/completions", completion_window="24h").id
            for _ in range(3)]
    everything = httpx.get(f"{batch_server.api}/batches", params={"limit": 100}).json()
    ids = [b["id"] for b in everything["data"]]
    assert ids[:3] == made[::-1] and not everything["has_more"]
    paged = [b.id for b in client.batches.list(limit=1)]  # the SDK follows `after`
    assert paged == ids
    bad = httpx.get(f"{batch_server.api}/batches", params={"after": "batch_nope"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cursor"
    for batch_id in made:
        wait_batch(batch_server, batch_id, {"completed"})


def test_a_batch_keeps_the_uploads_it_names(client: openai.OpenAI,
                                            batch_server: RunningServer) -> None:
    """Deleted (or expired) after the batch was created, an upload its lines name is still
    there for them: the batch copied it when it was validated."""
    image = client.files.create(file=("b.png", io.BytesIO(photo_bytes(seed=41))),
                                purpose="vision")
    part = {"type": "file", "file": {"file_id": image.id}}
    # Long text lines first, so the image lines run well after the upload is deleted.
    filler = [request_line(f"t{i}", [{"role": "user", "content": f"Count {i}"}],
                           max_tokens=40, ignore_eos=True) for i in range(150)]
    asks = [request_line(f"q{i}", [{"role": "user", "content": [
        {"type": "text", "text": f"Question {i}"}, part]}]) for i in range(3)]
    batch = client.batches.create(input_file_id=upload_batch(client, jsonl(filler + asks)).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    wait_batch(batch_server, batch.id, {"in_progress", "completed"})
    assert client.files.delete(image.id).deleted
    running = raw_batch(batch_server, batch.id)
    assert running.status == "in_progress" and running.request_counts is not None
    assert running.request_counts.completed < 150  # the image lines have not run yet
    done = wait_batch(batch_server, batch.id, {"completed", "failed"})
    assert done.request_counts is not None and done.request_counts.completed == 153, done
    outputs = read_lines(client, done.output_file_id)
    assert all(outputs[f"q{i}"]["response"]["body"]["timings"]["image_tokens"] > 0
               for i in range(3))
    images_dir = batch_server.log_path.parent / "batches" / "batches" / f"{batch.id}.images"
    assert not images_dir.exists()  # dropped when the batch ended
    chat = httpx.post(f"{batch_server.api}/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": [part]}], "max_tokens": 4})
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "file_not_found"
