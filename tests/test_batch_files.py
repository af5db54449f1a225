"""The Files API around batches, with the openai SDK on the real server: purposes (what an
upload may be for, what a listing filters on) and what deleting a running batch's input
does (the file goes for its owner at once, its bytes stay until the batch has ended)."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import photo_bytes
from test_batch_resume import results_on_disk, wait_results_on_disk
from test_batches import (
    jsonl,
    read_lines,
    request_line,
    two_keys,
    upload_batch,
    wait_batch,
)

from server.demo_model import DemoModelPaths


@pytest.fixture(scope="module")
def files_server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[RunningServer]:
    yield from two_keys(demo_model, tmp_path_factory, "batch-files")


def sdk(server: RunningServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key=key, max_retries=0, timeout=60)


def test_uploads_of_a_purpose_this_server_cannot_use_are_refused(
        files_server: RunningServer) -> None:
    client = sdk(files_server, "key-a")
    png = photo_bytes(64, 48)
    for purpose in ("vision", "user_data"):  # images a chat can name by file_id
        uploaded = client.files.create(file=("a.png", io.BytesIO(png)), purpose=purpose)
        assert uploaded.purpose == purpose
    for purpose in ("fine-tune", "assistants", "batch_output", "evals", ""):
        with pytest.raises(openai.BadRequestError) as caught:
            client.files.create(file=("a.png", io.BytesIO(png)),
                                purpose=purpose)  # type: ignore[arg-type]
        error = caught.value.body
        assert isinstance(error, dict), error
        assert error["param"] == "purpose" and error["code"] == "invalid_purpose", error
        assert repr(purpose) in error["message"]
    assert all(f.purpose in ("vision", "user_data") for f in client.files.list())


def test_listing_by_purpose_keeps_a_batch_cleanup_off_other_files(
        files_server: RunningServer) -> None:
    """The SDK sends `purpose` as a query parameter; a script that deletes every "batch"
    file must not take the key's images or the batches' output files with them."""
    client = sdk(files_server, "key-b")
    image = client.files.create(file=("a.png", io.BytesIO(photo_bytes(64, 48))),
                                purpose="vision")
    data = jsonl([request_line("one", [{"role": "user", "content": "Hi"}])])
    uploaded = upload_batch(client, data)
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.monotonic() + 60
    while (done := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline, done
        time.sleep(0.1)
    assert done.status == "completed" and done.output_file_id, done

    assert [f.id for f in client.files.list(purpose="batch")] == [uploaded.id]
    assert [f.id for f in client.files.list(purpose="batch_output")] == [done.output_file_id]
    assert [f.id for f in client.files.list(purpose="vision")] == [image.id]
    assert [f.id for f in client.files.list(purpose="fine-tune")] == []
    assert len(list(client.files.list())) == 3
    for f in client.files.list(purpose="batch"):
        client.files.delete(f.id)
    assert client.files.retrieve(image.id).purpose == "vision"
    assert set(read_lines(client, done.output_file_id)) == {"one"}
    # The cursor runs over the filtered listing, as the SDK's auto-paging expects.
    paged = [f.id for f in client.files.list(purpose="batch_output", limit=1)]
    assert paged == [done.output_file_id]


LINES = 20
TOKENS = 300


def test_deleting_a_running_batchs_input_keeps_its_bytes_until_it_ends(
        demo_model: DemoModelPaths, tmp_path: Path) -> None:
    """DELETE answers deleted and the file is gone for its owner, but the bytes stay: the
    batch killed after the delete resumes on restart and finishes every line (it used to
    fail, its results log dropped with no output file). Once it ended, the sweep takes
    them."""
    batch_dir = tmp_path / "batches"
    env = {"VLSERVE_BATCH_DIR": str(batch_dir), "VLSERVE_BATCH_IN_FLIGHT": "1",
           "VLSERVE_MAX_TOKENS_CAP": str(TOKENS),
           # Sweeps every 3 s (a tenth of it), so the test sees the bytes go.
           "VLSERVE_BATCH_RETENTION_S": "30"}
    first = start_server(demo_model, tmp_path / "first.log", "--n-parallel", "1", env=env)
    try:
        client = sdk(first, "unused")
        data = jsonl([request_line(f"line-{i}", [{"role": "user", "content": f"Count {i}"}],
                                   max_tokens=TOKENS, ignore_eos=True) for i in range(LINES)])
        uploaded = upload_batch(client, data)
        batch = client.batches.create(input_file_id=uploaded.id,
                                      endpoint="/v1/chat/completions", completion_window="24h")
        wait_results_on_disk(batch_dir, batch.id, 2)
        deleted = client.files.delete(uploaded.id)
        assert deleted.deleted and deleted.id == uploaded.id
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(uploaded.id)
        with pytest.raises(openai.NotFoundError):
            client.files.delete(uploaded.id)  # deleted once
        assert uploaded.id not in [f.id for f in client.files.list()]
        with pytest.raises(openai.BadRequestError, match="no batch file"):
            client.batches.create(input_file_id=uploaded.id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
        input_data = batch_dir / "files" / f"{uploaded.id}.data"
        assert input_data.read_bytes() == data  # still there for the running batch
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=30)
    finally:
        stop_server(first)
    before = len(results_on_disk(batch_dir, batch.id))
    assert 2 <= before < LINES, "the batch finished before the kill: make lines longer"

    second = start_server(demo_model, tmp_path / "second.log", "--n-parallel", "1", env=env)
    try:
        client = sdk(second, "unused")
        done = wait_batch(second, batch.id, {"completed", "failed"})
        assert done.status == "completed", done
        assert done.request_counts is not None and done.request_counts.completed == LINES
        assert set(read_lines(client, done.output_file_id)) == {
            f"line-{i}" for i in range(LINES)}
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(uploaded.id)  # still deleted after the restart
        deadline = time.monotonic() + 30
        while input_data.exists():  # no longer needed: the sweep takes it
            assert time.monotonic() < deadline, "the deleted input's bytes stayed"
            time.sleep(0.1)
        assert not input_data.with_suffix(".json").exists()
    finally:
        stop_server(second)


def test_deleting_an_idle_batch_file_frees_its_bytes_at_once(
        files_server: RunningServer) -> None:
    client = sdk(files_server, "key-a")
    uploaded = upload_batch(client, jsonl([request_line("x", [])]))
    files = files_server.log_path.parent / "batches" / "files"
    assert (files / f"{uploaded.id}.data").exists()
    assert client.files.delete(uploaded.id).deleted
    assert not (files / f"{uploaded.id}.data").exists()
    assert not (files / f"{uploaded.id}.json").exists()
    answer = httpx.get(f"{files_server.api}/files/{uploaded.id}", timeout=10,
                       headers={"Authorization": "Bearer key-a"})
    assert answer.status_code == 404


def test_a_failed_batchs_errors_are_bounded_and_name_lines_as_the_file_counts_them(
        files_server: RunningServer) -> None:
    client = sdk(files_server, "key-a")
    one = json.dumps(request_line("same", [{"role": "user", "content": "Hi"}])).encode()
    # A blank line first and between: errors count them, as a text editor (and OpenAI) do.
    data = b"\n" + one + b"\n\n" + b"\n".join([one] * 3000) + b"\n"
    batch = client.batches.create(input_file_id=upload_batch(client, data).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while (done := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline, done
        time.sleep(0.1)
    assert done.status == "failed" and done.errors is not None and done.errors.data
    errors = done.errors.data
    assert len(errors) == 101  # 3,000 problems: the first 100, then how many more
    assert [(e.code, e.line) for e in errors[:2]] == [("duplicate_custom_id", 4),
                                                      ("duplicate_custom_id", 5)]
    assert "used by lines 2 and 4" in str(errors[0].message)
    assert errors[-1].code == "too_many_errors" and errors[-1].line is None
    assert str(errors[-1].message).startswith("2,900 more problems")
    listed = httpx.get(f"{files_server.api}/batches", headers={"Authorization": "Bearer key-a"},
                       timeout=10)
    assert len(listed.content) < 64 * 1024  # was ~3.6 MB for this one batch


def test_completion_window_and_expires_after_are_whole_and_bounded(
        files_server: RunningServer) -> None:
    client = sdk(files_server, "key-a")
    headers = {"Authorization": "Bearer key-a"}
    uploaded = upload_batch(client, jsonl([request_line("x", [{"role": "user",
                                                                "content": "Hi"}])]))
    for window in ("24h\n", "8d", "169h", "99999999d", "0h", "24 h", "1.5h"):
        answer = httpx.post(f"{files_server.api}/batches", headers=headers, timeout=10, json={
            "input_file_id": uploaded.id, "endpoint": "/v1/chat/completions",
            "completion_window": window})
        assert answer.status_code == 400, (window, answer.text)
        error = answer.json()["error"]
        assert error["param"] == "completion_window", error
        assert "at most 7 days" in error["message"] and repr(window) in error["message"]
    longest = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="7d")  # type: ignore[arg-type]
    assert longest.expires_at == longest.created_at + 7 * 86400
    assert longest.completion_window == "7d"
    for seconds in ("³³³³", " 3600", "3600\n", "36e2", "2592001"):
        answer = httpx.post(f"{files_server.api}/files", headers=headers, timeout=10,
                            files={"file": ("in.jsonl", jsonl([request_line("x", [])]))},
                            data={"purpose": "batch", "expires_after[anchor]": "created_at",
                                  "expires_after[seconds]": seconds})
        assert answer.status_code == 400, (seconds, answer.text)
        assert answer.json()["error"]["param"] == "expires_after.seconds"


def test_file_content_streams_from_the_store_byte_for_byte(files_server: RunningServer
                                                           ) -> None:
    """Sent a chunk at a time from the open file, not read whole first; a delete once the
    download began does not cut it short."""
    client = sdk(files_server, "key-a")
    line = json.dumps(request_line("x", [{"role": "user", "content": "y" * 1000}]))
    data = "".join(line.replace('"x"', f'"x{i}"') + "\n" for i in range(5000)).encode()
    assert len(data) > 5_000_000
    uploaded = upload_batch(client, data)
    headers = {"Authorization": "Bearer key-a"}
    with httpx.stream("GET", f"{files_server.api}/files/{uploaded.id}/content",
                      headers=headers, timeout=30) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-length"] == str(len(data))
        assert answer.headers["content-type"].startswith("application/jsonl")
        chunks = answer.iter_raw(64 * 1024)
        received = next(chunks)
        assert client.files.delete(uploaded.id).deleted
        received += b"".join(chunks)
    assert received == data
    missing = httpx.get(f"{files_server.api}/files/{uploaded.id}/content", headers=headers,
                        timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "file_not_found"


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory since the last reset_peak."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # Linux: the peak := the current
    except OSError:
        return False
    return True


def test_downloads_do_not_hold_whole_files_in_memory(files_server: RunningServer) -> None:
    """Ten downloads of a 40 MB file at once: the server holds a chunk of each at a time,
    not ten copies of the file (it used to read each whole before sending it)."""
    pid = files_server.process.pid
    client = sdk(files_server, "key-b")
    line = json.dumps(request_line("x", [{"role": "user", "content": "y" * 1000}]))
    data = "".join(line.replace('"x"', f'"x{i}"') + "\n" for i in range(36_000)).encode()
    assert len(data) > 40_000_000
    uploaded = upload_batch(client, data)
    url = f"{files_server.api}/files/{uploaded.id}/content"
    time.sleep(0.5)  # the upload's buffers freed
    if not reset_peak(pid):
        pytest.skip("needs Linux's /proc/<pid>/clear_refs")
    before = peak_rss_mib(pid)
    with httpx.Client(headers={"Authorization": "Bearer key-b"}, timeout=30) as http:
        streams = [http.stream("GET", url) for _ in range(10)]
        answers = [s.__enter__() for s in streams]
        try:
            received = [b"".join(a.iter_raw(1024 * 1024)) for a in answers]
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    assert all(r == data for r in received)
    grew = peak_rss_mib(pid) - before
    assert grew < 100, f"the server's peak grew by {grew:.0f} MiB for 10 downloads of 40 MB"
    client.files.delete(uploaded.id)
