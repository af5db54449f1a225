"""Batch jobs survive a kill -9 (issue 19, Build 3): a restarted server resumes the batch,
keeps every line finished before the kill and runs each of the others exactly once."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from pathlib import Path

import openai
from conftest import start_server, stop_server
from helpers import photo_bytes
from test_batches import jsonl, read_lines, request_line, wait_batch

from server.demo_model import DemoModelPaths

LINES = 30
TOKENS = 400  # each line takes a while, so the kill lands mid-batch


def results_on_disk(batch_dir: Path, batch_id: str) -> list[dict]:
    path = batch_dir / "batches" / f"{batch_id}.results"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.endswith(b"}")]


def wait_results_on_disk(batch_dir: Path, batch_id: str, count: int) -> None:
    """Until the batch's results log holds `count` lines (2 minutes at most)."""
    deadline = time.monotonic() + 120
    while len(results_on_disk(batch_dir, batch_id)) < count:
        assert time.monotonic() < deadline, "the batch made no progress"
        time.sleep(0.01)


def test_kill_9_mid_batch_then_restart(demo_model: DemoModelPaths, tmp_path: Path) -> None:
    batch_dir = tmp_path / "batches"
    # One line at a time in one slot: the kill finds a line running and others unstarted.
    args = ("--n-parallel", "1")
    env = {"VLSERVE_BATCH_DIR": str(batch_dir), "VLSERVE_BATCH_IN_FLIGHT": "1",
           "VLSERVE_MAX_TOKENS_CAP": str(TOKENS)}
    first = start_server(demo_model, tmp_path / "first.log", *args, env=env)
    try:
        client = openai.OpenAI(base_url=first.api, api_key="unused", max_retries=0, timeout=60)
        # The last line names an uploaded image: uploads live in memory, so the batch must
        # have kept it on disk for the restarted server.
        image = client.files.create(file=("cat.png", io.BytesIO(photo_bytes(seed=9))),
                                    purpose="vision")
        messages = [[{"role": "user", "content": f"Count {i}"}] for i in range(LINES - 1)]
        messages.append([{"role": "user", "content": [
            {"type": "text", "text": "What is it?"},
            {"type": "file", "file": {"file_id": image.id}}]}])
        data = jsonl([request_line(f"line-{i}", m, max_tokens=TOKENS, ignore_eos=True)
                      for i, m in enumerate(messages)])
        uploaded = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id,
                                      endpoint="/v1/chat/completions", completion_window="24h")
        wait_results_on_disk(batch_dir, batch.id, 3)
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=30)
    finally:
        stop_server(first)
    before = {r["custom_id"]: r for r in results_on_disk(batch_dir, batch.id)}
    assert 3 <= len(before) < LINES, "the batch finished before the kill: make lines longer"

    second = start_server(demo_model, tmp_path / "second.log", *args, env=env)
    try:
        client = openai.OpenAI(base_url=second.api, api_key="unused", max_retries=0,
                               timeout=60)
        done = wait_batch(second, batch.id, {"completed", "failed"})
        assert done.status == "completed", done
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed) == (LINES, LINES)
        outputs = read_lines(client, done.output_file_id)  # each custom_id once
        assert set(outputs) == {f"line-{i}" for i in range(LINES)}
        for custom_id, result in before.items():  # finished before the kill: not run again
            assert outputs[custom_id]["id"] == result["id"]
            assert outputs[custom_id]["response"]["body"]["id"] == \
                result["response"]["body"]["id"]
        assert all(o["response"]["body"]["usage"]["completion_tokens"] == TOKENS
                   for o in outputs.values())
        last = outputs[f"line-{LINES - 1}"]["response"]["body"]
        assert last["timings"]["image_tokens"] > 0
        assert not (batch_dir / "batches" / f"{batch.id}.images").exists()  # dropped at the end
        log = second.log()
        assert f"batch {batch.id} resumes (in_progress)" in log
        # The restarted server ran exactly the lines without a result, each once.
        ran = [line for line in log.splitlines()
               if '"event": "chat_completion"' in line and f'"{batch.id}:' in line]
        assert len(ran) == LINES - len(before)
    finally:
        stop_server(second)


def test_sigterm_hands_running_lines_back(demo_model: DemoModelPaths, tmp_path: Path) -> None:
    """A graceful stop does not wait for the batch (it could take hours): running lines are
    stopped, recorded nowhere, and run after the restart. Its input file expires meanwhile
    (after 3 s here), yet stays until the batch no longer needs it."""
    batch_dir = tmp_path / "batches"
    tokens = 1500
    # expires_at is whole seconds (created_at + ttl): 3 s leaves the batch at least 2 s to be
    # created from it (with 1 s, a loaded box sometimes found it expired already).
    env = {"VLSERVE_BATCH_DIR": str(batch_dir), "VLSERVE_MAX_TOKENS_CAP": str(tokens),
           "VLSERVE_BATCH_FILE_TTL_S": "3"}
    first = start_server(demo_model, tmp_path / "first.log", "--n-parallel", "1", env=env)
    try:
        client = openai.OpenAI(base_url=first.api, api_key="unused", max_retries=0, timeout=60)
        data = jsonl([request_line(f"line-{i}", [{"role": "user", "content": f"Count {i}"}],
                                   max_tokens=tokens, ignore_eos=True) for i in range(8)])
        uploaded = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 3600})
        deadline = time.monotonic() + 120
        while not results_on_disk(batch_dir, batch.id):
            assert time.monotonic() < deadline, "the batch made no progress"
            time.sleep(0.01)
        first.process.send_signal(signal.SIGTERM)
        first.process.wait(timeout=20)  # well inside drain_timeout (30 s)
    finally:
        stop_server(first)
    log = first.log()
    assert "drained after" in log, log
    # The runner noticed the drain (within its 1 s tick) and stopped its lines in the
    # engine instead of letting them finish or starting new ones.
    assert f"request {batch.id}:" in log and "cancelled (client gone)" in log
    before = len(results_on_disk(batch_dir, batch.id))
    assert before < 8

    assert uploaded.expires_at is not None
    time.sleep(max(0.0, uploaded.expires_at + 0.2 - time.time()))  # expired while down
    second = start_server(demo_model, tmp_path / "second.log", "--n-parallel", "1", env=env)
    try:
        client = openai.OpenAI(base_url=second.api, api_key="unused", max_retries=0,
                               timeout=60)
        done = wait_batch(second, batch.id, {"completed", "failed"})
        assert done.status == "completed", done  # its expired input was still there
        assert done.request_counts is not None and done.request_counts.completed == 8
        assert len(read_lines(client, done.output_file_id)) == 8
        input_data = batch_dir / "files" / f"{uploaded.id}.data"
        deadline = time.monotonic() + 30
        while input_data.exists():  # no longer needed: the sweep takes it
            assert time.monotonic() < deadline, "the expired input file stayed"
            time.sleep(0.1)
    finally:
        stop_server(second)
