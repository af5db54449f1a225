"""Batch lines run below interactive requests (issue 19, Build 4): they fill idle slots, and
a chat arriving while batch lines hold every slot takes one at once by preempting a line,
which resumes later with nothing lost."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import RunningServer, start_server, stop_server
from playwright.sync_api import Browser, expect
from test_batches import create_batch, read_lines, request_line, wait_batch
from test_kv_capacity import preemptions_total
from test_playground import browser  # noqa: F401  (Chromium, or why not)

from server.demo_model import DemoModelPaths

TOKENS = 1500  # long lines: the chat arrives while one holds the only slot


@pytest.fixture(scope="module")
def one_slot(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[RunningServer]:
    running = start_server(demo_model, tmp_path_factory.mktemp("prio") / "server.log",
                           "--n-parallel", "1", "--n-ctx", "4096",
                           env={"VLSERVE_MAX_TOKENS_CAP": str(TOKENS)})
    yield running
    stop_server(running)


def batch_line_running(server: RunningServer, batch_id: str, timeout: float = 60) -> None:
    """Wait until the only slot generates a line of the batch, well before its end."""
    deadline = time.monotonic() + timeout
    while True:
        slot = httpx.get(f"{server.api}/slots", timeout=10).json()["slots"][0]
        if str(slot["request_id"]).startswith(f"{batch_id}:") \
                and 0 < int(slot["generated_tokens"]) < TOKENS // 3:
            return
        assert time.monotonic() < deadline, slot
        time.sleep(0.002)


def test_interactive_chat_preempts_a_batch_line(one_slot: RunningServer) -> None:
    client = openai.OpenAI(base_url=one_slot.api, api_key="unused", max_retries=0, timeout=60)
    batch = create_batch(client, stories(3))
    preempted_before = preemptions_total(one_slot)
    batch_line_running(one_slot, batch.id)

    chat = client.chat.completions.create(
        model="m", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "Quick question"}])
    assert chat.choices[0].finish_reason == "length"
    # The chat did not wait for the line: that line stepped aside for it.
    assert raw_status(one_slot, batch.id) == "in_progress"
    assert preemptions_total(one_slot) >= preempted_before + 1
    assert "(a higher-priority request is waiting" in one_slot.log()

    done = wait_batch(one_slot, batch.id, {"completed", "failed"})
    assert done.status == "completed", done
    outputs = read_lines(client, done.output_file_id)
    timings = {k: o["response"]["body"]["timings"] for k, o in outputs.items()}
    assert any(t["preemptions"] >= 1 for t in timings.values()), timings
    # The preempted line resumed and finished whole.
    assert all(t["completion_tokens"] == TOKENS for t in timings.values())
    assert chat.model_extra["timings"]["preemptions"] == 0


def stories(n: int) -> list[dict]:
    """`n` batch lines that each run to TOKENS tokens."""
    return [request_line(f"r{i}", [{"role": "user", "content": f"Story {i}"}],
                         max_tokens=TOKENS, ignore_eos=True) for i in range(n)]


def raw_status(server: RunningServer, batch_id: str) -> str:
    return httpx.get(f"{server.api}/batches/{batch_id}", timeout=10).json()["status"]


def test_completion_window_expiry(one_slot: RunningServer) -> None:
    """Lines the window leaves unrun end as OpenAI's `batch_expired` entries; the finished
    ones stay in the output file, whole."""
    client = openai.OpenAI(base_url=one_slot.api, api_key="unused", max_retries=0, timeout=60)
    batch = create_batch(client, stories(40), "2s")
    assert batch.expires_at == batch.created_at + 2
    done = wait_batch(one_slot, batch.id, {"expired", "completed", "failed"})
    assert done.status == "expired" and done.expired_at, done
    counts = done.request_counts
    assert counts is not None and counts.total == 40
    assert counts.completed < 40 and counts.completed + counts.failed == 40
    errors = read_lines(client, done.error_file_id)
    assert len(errors) == 40 - counts.completed
    assert all(e["error"]["code"] == "batch_expired" and e["response"] is None
               for e in errors.values())
    if counts.completed:
        finished = read_lines(client, done.output_file_id)
        assert all(o["response"]["body"]["usage"]["completion_tokens"] == TOKENS
                   for o in finished.values())


def test_playground_status_line_shows_a_running_batch(one_slot: RunningServer,
                                                      browser: Browser) -> None:  # noqa: F811
    client = openai.OpenAI(base_url=one_slot.api, api_key="unused", max_retries=0, timeout=60)
    batch = create_batch(client, stories(40))
    try:
        wait_batch(one_slot, batch.id, {"in_progress"})
        context = browser.new_context()
        page = context.new_page()
        page.goto(one_slot.url)
        expect(page.locator("#status-text")).to_contain_text(
            re.compile(r"batch \d+/40"), timeout=30_000)
        context.close()
    finally:
        client.batches.cancel(batch.id)
    wait_batch(one_slot, batch.id, {"cancelled"})
