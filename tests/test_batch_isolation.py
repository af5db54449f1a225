"""One key's batch never holds up another's: a bad line is that line's error, a batch whose
input cannot be loaded fails alone, and a big batch shares the engine with a small one
submitted after it. On the real engine and the tiny demo model, with the openai SDK."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import openai
import pytest
from conftest import RunningServer, start_server, stop_server
from test_batches import create_batch, jsonl, read_lines, request_line, upload_batch

from server.demo_model import DemoModelPaths

SLOTS = 2  # the runner keeps SLOTS + 1 lines in the engine


@pytest.fixture(scope="module")
def server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RunningServer]:
    running = start_server(demo_model, tmp_path_factory.mktemp("batch-iso") / "server.log",
                           "--n-parallel", str(SLOTS),
                           env={"VLSERVE_API_KEYS": "key-a,key-b"})
    yield running
    stop_server(running)


def sdk(server: RunningServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key=key, max_retries=0, timeout=60)


def hello(custom_id: str, **body: object) -> dict:
    return request_line(custom_id, [{"role": "user", "content": f"Hi {custom_id}"}], **body)


def wait(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout: float = 60
         ) -> openai.types.Batch:
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in statuses:
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)
    return batch


def test_bad_lines_are_line_errors_and_stop_no_other_batch(server: RunningServer) -> None:
    a, b = sdk(server, "key-a"), sdk(server, "key-b")
    poisoned = create_batch(a, [hello("ok1"), {**hello("listed"), "url": [
        "/v1/chat/completions"]}, "[" * 100_000, hello("ok2")])
    after = create_batch(b, [hello("b1")])
    done_b = wait(b, after.id, {"completed", "failed"})
    assert done_b.status == "completed" and done_b.request_counts.completed == 1
    done = wait(a, poisoned.id, {"completed", "failed"})
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 2)
    assert set(read_lines(a, done.output_file_id)) == {"ok1", "ok2"}
    errors = read_lines(a, done.error_file_id)
    assert errors["listed"]["error"]["message"] == \
        "url must be a string naming the batch's endpoint '/v1/chat/completions'"
    assert errors[None]["error"]["message"] == \
        "the line's JSON is nested too deeply (its body at most 64 levels)"


def test_a_batch_whose_input_cannot_be_read_fails_and_others_run(server: RunningServer
                                                                  ) -> None:
    a, b = sdk(server, "key-a"), sdk(server, "key-b")
    uploaded = upload_batch(a, jsonl([hello("x")]))
    data = server.log_path.parent / "batches" / "files" / f"{uploaded.id}.data"
    data.unlink()
    data.mkdir()  # unreadable as a file, even for root (unlike chmod 000)
    try:
        broken = a.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
        other = create_batch(b, [hello("b1")])
        failed = wait(a, broken.id, {"completed", "failed"})
        assert failed.status == "failed", failed
        assert failed.errors is not None and failed.errors.data is not None
        assert [(e.code, e.message) for e in failed.errors.data] == [("batch_failed", (
            "the input file could not be read or parsed (IsADirectoryError)"))]
        assert wait(b, other.id, {"completed", "failed"}).status == "completed"
        # The runner carries on for key a too.
        assert wait(a, create_batch(a, [hello("y")]).id, {"completed", "failed"}).status == \
            "completed"
    finally:
        shutil.rmtree(data, ignore_errors=True)


def test_a_small_batch_of_another_key_runs_while_a_big_one_is_running(
        server: RunningServer) -> None:
    a, b = sdk(server, "key-a"), sdk(server, "key-b")
    total = 400
    big = create_batch(a, [hello(f"a{i}", max_tokens=8, ignore_eos=True)
                           for i in range(total)])
    deadline = time.monotonic() + 60
    while (progress := a.batches.retrieve(big.id)).request_counts.completed < SLOTS:
        assert time.monotonic() < deadline, progress
        time.sleep(0.05)
    small = create_batch(b, [hello("b1", max_tokens=8, ignore_eos=True)])
    done = wait(b, small.id, {"completed", "failed", "expired"}, timeout=120)
    running = a.batches.retrieve(big.id)
    assert done.status == "completed", done
    # Oldest first across keys, B's line could start only once A's last line had: A
    # would be all but done. Shared, A still has most of its lines ahead of it.
    finished = running.request_counts.completed + running.request_counts.failed
    assert running.status == "in_progress" and finished < total - SLOTS - 1, running
    assert "b1" in read_lines(b, done.output_file_id)
    a.batches.cancel(big.id)
    wait(a, big.id, {"cancelled"})
