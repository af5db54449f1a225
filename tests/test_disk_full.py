"""A full disk under batch_dir (planted by tests/faulty_server.py: writes there fail with
ENOSPC partway) is a 507 the client can retry, one log line telling the operator what to
do, no half-written file left to keep the disk full, and a server that serves on and takes
files again once space is back."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import RunningServer, start_server, stop_server
from faulty_server import fill_disk
from test_batches import jsonl
from test_faults import FAULTY

from server.batches.store import BatchStore
from server.demo_model import DemoModelPaths

LINE = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": "Hello " * 200}], "max_tokens": 2}}


@pytest.fixture(scope="module")
def full_disk(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[RunningServer, Path]]:
    folder = tmp_path_factory.mktemp("disk_full")
    flag = folder / "full"
    running = start_server(demo_model, folder / "server.log", launcher=FAULTY,
                           env={"VLSERVE_TEST_FAULT_DISK_FULL": str(flag)})
    yield running, flag
    stop_server(running)


def upload(server: RunningServer) -> httpx.Response:
    return httpx.post(f"{server.api}/files", timeout=30, data={"purpose": "batch"},
                      files={"file": ("in.jsonl", io.BytesIO(jsonl([LINE])))})


def test_a_full_disk_is_a_507_that_leaves_nothing_behind(
        full_disk: tuple[RunningServer, Path]) -> None:
    server, flag = full_disk
    kept = upload(server)  # no flag: room for everything
    assert kept.status_code == 200, kept.text
    batches = server.log_path.parent / "batches"
    before = sorted(p.name for p in batches.rglob("*"))

    # Room for the file's data but not its record: the data must not stay behind either.
    flag.write_text(str(len(jsonl([LINE])) + 40))
    refused = upload(server)
    assert refused.status_code == 507, refused.text
    assert sorted(p.name for p in batches.rglob("*")) == before

    flag.write_text("")  # the disk is full
    refused = upload(server)
    assert refused.status_code == 507, refused.text
    assert refused.json()["error"]["code"] == "insufficient_storage"
    assert refused.headers["Retry-After"]
    assert "No space left" not in refused.text  # the operator's detail stays in the log
    # A batch on the file kept before: its record cannot be written either.
    batch = httpx.post(f"{server.api}/batches", timeout=30, json={
        "input_file_id": kept.json()["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"})
    assert batch.status_code == 507, batch.text
    # Neither the half-written temporary files nor a data file without its record stay.
    assert sorted(p.name for p in batches.rglob("*")) == before
    log = server.log()
    assert "the disk is full" in log and "batch_file_ttl_s" in log
    # One line for the operator, not a traceback.
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    chat = httpx.post(f"{server.api}/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert chat.status_code == 200, chat.text

    flag.unlink()  # space is back
    again = upload(server)
    assert again.status_code == 200, again.text
    client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0)
    assert {f.id for f in client.files.list()} >= {kept.json()["id"], again.json()["id"]}


def test_a_result_cut_by_a_full_disk_leaves_no_torn_line(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A result line the disk had room for only part of is cut off again: the line's retry
    is appended whole after it, not glued to its torn half (and both lost to the reader)."""
    store = BatchStore(tmp_path / "batches")
    (tmp_path / "batches" / "batches").mkdir(parents=True)  # made by the first batch's record
    store.append_result("batch_1", {"custom_id": "a"})
    free = tmp_path / "free"
    free.write_text("10")  # room for 10 bytes of the next line
    monkeypatch.setattr(Path, "open", Path.open)  # restored after the test
    fill_disk(free, tmp_path / "batches")
    with pytest.raises(OSError, match="No space left"):
        store.append_result("batch_1", {"custom_id": "b", "response": "x" * 100})
    free.unlink()  # space is back: the runner's retry
    store.append_result("batch_1", {"custom_id": "b", "response": "x" * 100})
    assert [r["custom_id"] for r in store.read_results("batch_1")] == ["a", "b"]
