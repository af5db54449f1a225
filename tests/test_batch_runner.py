"""The batch runner's loop on its own (no engine, no HTTP): a batch that cannot be loaded
ends failed without stopping the others, the input is parsed off the event loop, free
places go to the owner with the fewest lines running, and an expired batch records its
unrun lines in one append. (End to end on the real engine: test_batches*.py.)"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import MagicMock

import pytest
from redis_server import start_redis

from server.batches import lines as batch_lines
from server.batches import runner as runner_module
from server.batches import store as store_module
from server.batches.job import BatchJob, new_batch, set_status
from server.batches.redis_store import BatchStorage, LeaseLost, RedisBatchStore
from server.batches.runner import BatchRunner
from server.batches.store import BatchStore
from server.config import Settings

ENDPOINT = "/v1/chat/completions"


def jsonl(n: int, tag: str) -> bytes:
    return b"".join(json.dumps({"custom_id": f"{tag}{i}", "method": "POST", "url": ENDPOINT,
                                "body": {"messages": []}}).encode() + b"\n" for i in range(n))


def make_runner(tmp_path: Path) -> BatchRunner:
    state = SimpleNamespace(settings=Settings(), metrics=MagicMock(), uploads=None,
                            drain=SimpleNamespace(draining=False),
                            engine=SimpleNamespace(ready=False))
    return BatchRunner(app=None, state=state, store=BatchStore(tmp_path))  # type: ignore[arg-type]


def runner_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The runner's monotonic clock, moved by hand (clock[0] += s) past its waits."""
    clock = [time.monotonic()]
    monkeypatch.setattr(runner_module, "time", SimpleNamespace(
        monotonic=lambda: clock[0], time=time.time))
    return clock


def add_batch(runner: BatchRunner, owner: str, data: bytes) -> BatchJob:
    upload = runner.store.add_file("in.jsonl", "batch", data, owner)
    batch = new_batch(owner, upload.id, ENDPOINT, "24h", None)
    runner.batches[batch["id"]] = batch
    job = runner.jobs[batch["id"]] = BatchJob(batch)
    return job


def test_a_batch_whose_input_cannot_be_parsed_fails_alone_and_the_others_go_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = make_runner(tmp_path)
    broken = add_batch(runner, "a", jsonl(2, "x"))
    fine = add_batch(runner, "b", jsonl(2, "y"))
    parse = batch_lines.parse

    def flaky(data: bytes, *args: Any) -> Any:
        if b'"x0"' in data:
            raise ValueError("/secret/path went wrong")
        return parse(data, *args)

    monkeypatch.setattr(batch_lines, "parse", flaky)
    asyncio.run(runner._advance())
    assert broken.batch["status"] == "failed"
    assert broken.batch["errors"]["data"] == [{
        "code": "batch_failed", "param": None, "line": None,
        "message": "the input file could not be read or parsed (ValueError)"}]
    assert broken.id not in runner.jobs
    assert fine.batch["status"] == "in_progress" and len(fine.lines) == 2
    saved = json.loads((tmp_path / "batches" / f"{broken.id}.json").read_bytes())
    assert saved["status"] == "failed" and "secret" not in json.dumps(saved)


def test_a_batch_whose_step_keeps_raising_ends_failed_after_a_few_tries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = make_runner(tmp_path)
    stuck = add_batch(runner, "a", jsonl(2, "x"))
    other = add_batch(runner, "b", jsonl(2, "y"))
    asyncio.run(runner._advance())  # both load
    step = runner._step

    async def failing(job: BatchJob) -> None:
        if job is stuck:
            raise OSError("disk trouble")
        await step(job)

    monkeypatch.setattr(runner, "_step", failing)
    clock = runner_clock(monkeypatch)
    for attempt in range(1, 6):
        asyncio.run(runner._advance())  # raises here, before the fix
        assert stuck.batch["status"] == ("failed" if attempt == 5 else "in_progress")
        clock[0] += 60  # past its wait before the next try
    assert stuck.batch["status"] == "failed"
    assert "failed 5 times in a row (OSError)" in stuck.batch["errors"]["data"][0]["message"]
    assert other.batch["status"] == "in_progress" and other.id in runner.jobs


def test_a_load_that_fails_for_a_while_is_tried_again_not_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Too many open files, a full disk: nothing wrong with the input, so the batch waits
    and loads once the trouble is gone, instead of ending failed "could not be parsed"."""
    runner = make_runner(tmp_path)
    job = add_batch(runner, "a", jsonl(2, "x"))
    parse, trouble = batch_lines.parse, [True]

    def flaky(*args: Any) -> Any:
        if trouble[0]:
            raise OSError(24, "Too many open files")
        return parse(*args)

    monkeypatch.setattr(batch_lines, "parse", flaky)
    clock = runner_clock(monkeypatch)
    for _ in range(3):
        asyncio.run(runner._advance())
        clock[0] += 60
    assert job.batch["status"] == "validating" and job.id in runner.jobs
    trouble[0] = False
    asyncio.run(runner._advance())
    assert job.batch["status"] == "in_progress" and len(job.lines) == 2


def test_an_ending_batch_whose_files_cannot_be_written_keeps_its_results(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every line ran; the output file cannot be written (a full disk) for many tries. The
    batch stays finalizing with its results log, never ends failed with it deleted, and
    completes once the disk has room."""
    runner = make_runner(tmp_path)
    job = add_batch(runner, "a", jsonl(3, "x"))
    asyncio.run(runner._advance())  # loads it
    for line in job.lines:
        result = {"_i": line.index, "custom_id": line.custom_id, "error": None,
                  "response": {"status_code": 200, "body": {}}}
        runner.store.append_result(job.id, result)
        job.record(result)
    add_file, full = runner.store.add_file, [True]

    def disk(*args: Any, **kwargs: Any) -> Any:
        if full[0] and args[1] == "batch_output":
            raise OSError(28, "No space left on device")
        return add_file(*args, **kwargs)

    monkeypatch.setattr(runner.store, "add_file", disk)
    clock = runner_clock(monkeypatch)
    for _ in range(8):
        asyncio.run(runner._advance())
        clock[0] += 60
    assert job.batch["status"] == "finalizing" and job.id in runner.jobs
    assert len(runner.store.read_results(job.id)) == 3
    full[0] = False
    asyncio.run(runner._advance())
    assert job.batch["status"] == "completed" and not job.batch.get("errors"), job.batch
    assert len(runner.store.file_bytes(job.batch["output_file_id"]).splitlines()) == 3


def test_the_input_is_parsed_and_taken_in_off_the_event_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = make_runner(tmp_path)
    job = add_batch(runner, "a", jsonl(3, "x"))
    threads: list[str] = []
    parse, start = batch_lines.parse, BatchJob.start

    def parse_spy(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return parse(*args)

    def start_spy(self: BatchJob, *args: Any) -> None:
        threads.append(threading.current_thread().name)
        start(self, *args)

    monkeypatch.setattr(batch_lines, "parse", parse_spy)
    monkeypatch.setattr(BatchJob, "start", start_spy)
    asyncio.run(runner._advance())
    assert job.batch["status"] == "in_progress"
    assert len(threads) == 2 and threading.main_thread().name not in threads


def test_free_places_go_to_the_owner_with_the_fewest_lines_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = make_runner(tmp_path)
    big = add_batch(runner, "a", jsonl(50, "a"))
    big2 = add_batch(runner, "a", jsonl(50, "c"))
    small = add_batch(runner, "b", jsonl(3, "b"))
    launched: list[str] = []

    async def run_line(job: BatchJob, line: Any, cancel: asyncio.Event) -> None:
        launched.append(line.custom_id)

    async def scenario() -> None:
        await runner._advance()  # loads them (the engine is not ready: nothing launched)
        monkeypatch.setattr(runner, "_run_line", run_line)
        runner._launch()
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert runner.limit == 5
    assert launched == ["a0", "b0", "c0", "b1", "a1"]
    assert [len(j.running) for j in (big, big2, small)] == [2, 1, 2]
    # Owner a holds four places: the one left goes to b, however old a's batches are.
    for job in (big, big2, small):
        job.running.clear()
    big.running.update({i: asyncio.Event() for i in range(100, 104)})
    runner.in_flight = 4
    launched.clear()
    asyncio.run(scenario())
    assert launched == ["b2"]
    # A batch whose steps failed too often starts no more lines: they are being stopped.
    for job in (big, big2, small):
        job.running.clear()
    runner.in_flight = 0
    runner._trouble[small.id] = (runner_module._GIVE_UP_AFTER, 0.0)
    launched.clear()
    asyncio.run(scenario())
    assert launched and not any(name.startswith("b") for name in launched)


def test_an_expired_batch_records_its_unrun_lines_in_one_append(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = make_runner(tmp_path)
    job = add_batch(runner, "a", jsonl(2000, "x"))
    asyncio.run(runner._advance())  # loads it
    fsyncs = 0
    real_fsync = store_module.os.fsync

    def counting(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        real_fsync(fd)

    monkeypatch.setattr(store_module.os, "fsync", counting)
    job.batch["_final"] = "expired"
    set_status(job.batch, "finalizing")
    asyncio.run(runner._finalize(job))
    assert job.batch["status"] == "expired"
    assert job.batch["request_counts"] == {"total": 2000, "completed": 0, "failed": 2000}
    errors = runner.store.file_bytes(job.batch["error_file_id"]).splitlines()
    assert len(errors) == 2000
    assert json.loads(errors[0])["error"]["code"] == "batch_expired"
    # One for the results log, the rest for the error file and the batch record (each file
    # and its folder): not one per line.
    assert fsyncs < 20, fsyncs


@pytest.fixture(params=["disk", "redis"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BatchStorage]:
    if request.param == "disk":
        yield BatchStore(tmp_path)
        return
    (tmp_path / "redis").mkdir()
    server = start_redis(tmp_path / "redis")
    shared = RedisBatchStore(server.url(0), "one")
    try:
        yield shared
    finally:
        shared.close()
        server.stop()


def test_several_results_append_in_one_go_and_only_for_the_holder(
        storage: BatchStorage) -> None:
    record = {**new_batch("me", "file-0", ENDPOINT, "24h", None), "id": "batch_1"}
    storage.save_batch("batch_1", json.dumps(record).encode(), 1)
    if isinstance(storage, RedisBatchStore):
        with pytest.raises(LeaseLost):  # nobody holds it: fenced, nothing written
            storage.append_results("batch_1", [{"_i": 0}, {"_i": 1}])
        assert storage.read_results("batch_1") == []
        assert storage.claim("batch_1", 60)
    storage.append_result("batch_1", {"_i": 0})
    storage.append_results("batch_1", [{"_i": 1}, {"_i": 2, "x": "é"}])
    assert storage.read_results("batch_1") == [{"_i": 0}, {"_i": 1}, {"_i": 2, "x": "é"}]
