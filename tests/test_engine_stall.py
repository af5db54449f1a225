"""No body one client sends holds the engine thread (issue 21, row 3).

Before, prompts were rendered and tokenized on the engine thread, with special-token
parsing that grows with the square of the matches: 100k x "</s>" took 16 s there, 200k
short messages 43 s, 45 MB of text 14 s, and every other stream stood still meanwhile.
Now a request is prepared on a worker thread, text that cannot fit is refused from its size,
and client text is tokenized without special-token parsing (linear).
"""

from __future__ import annotations

import gc
import itertools
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server

from server.demo_model import DemoModelPaths

MAX_GAP_S = 0.25


@pytest.fixture(scope="module")
def stall_server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[RunningServer]:
    running = start_server(demo_model, tmp_path_factory.mktemp("stall") / "server.log",
                           "--n-parallel", "2", "--n-ctx", "4096",
                           env={"VLSERVE_MAX_TOKENS_CAP": "3000"})
    yield running
    stop_server(running)


class Watch:
    """Streams one long generation after another, recording when each token arrives."""

    def __init__(self, server: RunningServer) -> None:
        self.streams: list[list[float]] = []
        self._stop = threading.Event()
        self.started = threading.Event()
        # The arrivals are timed in this process: a full collection of its heap (late in
        # the suite, millions of objects: 0.6 s measured) would pass for a server stall.
        gc.collect()
        gc.disable()
        self._thread = threading.Thread(target=self._run, args=(server,), daemon=True)
        self._thread.start()

    def _run(self, server: RunningServer) -> None:
        body = {"messages": [{"role": "user", "content": "Go on."}], "temperature": 0,
                "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                arrivals: list[float] = []
                self.streams.append(arrivals)
                with client.stream("POST", f"{server.api}/chat/completions",
                                   json=body) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: {"):
                            arrivals.append(time.perf_counter())
                            if len(arrivals) > 5:
                                self.started.set()

    def largest_gap(self) -> float:
        self._stop.set()
        self._thread.join(120)
        gc.enable()
        # From the second token on: the first waits for the prompt, not for others.
        return max((b - a for s in self.streams for a, b in itertools.pairwise(s[1:])),
                   default=0.0)


def post_from_another_process(server: RunningServer, body: bytes, tmp_path: Path
                              ) -> tuple[int, dict]:
    """curl sends the body: building and writing 45 MB in this process would compete with
    the watching thread for the interpreter and blur what the server does."""
    path = tmp_path / "body.json"
    path.write_bytes(body)
    out = subprocess.run(
        ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "-H", "Content-Type: application/json",
         "--data-binary", f"@{path}", f"{server.api}/chat/completions"],
        capture_output=True, timeout=120, check=True).stdout.decode()
    text, status = out.rsplit("\n", 1)
    return int(status), json.loads(text)


# Each row-3 body, how it is refused (text over the context: from its size alone, before
# tokenizing; 200k messages: before the JSON is even parsed, too many arrays and objects),
# and the longest pause it may cause another stream. The 45 MB body is parsed off the event
# loop (server/api/offloop_json.py): measured pauses 60-180 ms on this shared 2-core machine,
# 230-270 ms with the parse on the loop, 14-20 s before prompts left the engine thread.
BODIES = {
    "100k special tokens": (
        lambda: {"messages": [{"role": "user", "content": "</s>" * 100_000}]},
        "context_length_exceeded", "at least", MAX_GAP_S),
    "200k short messages": (
        lambda: {"messages": [{"role": "user", "content": "hi"}] * 200_000},
        "json_too_large", "arrays and objects", MAX_GAP_S),
    "45 MB of text": (
        lambda: {"messages": [{"role": "user", "content": "lorem ipsum " * 3_750_000}]},
        "context_length_exceeded", "at least", MAX_GAP_S),
}


@pytest.mark.parametrize("name", list(BODIES))
def test_a_huge_prompt_is_refused_without_stalling_other_streams(
        stall_server: RunningServer, name: str, tmp_path: Path) -> None:
    build, code, reason, max_gap = BODIES[name]
    body = json.dumps({**build(), "max_tokens": 4}).encode()
    watch = Watch(stall_server)
    assert watch.started.wait(60)
    time.sleep(0.2)
    started = time.perf_counter()
    status, answer = post_from_another_process(stall_server, body, tmp_path)
    took = time.perf_counter() - started
    time.sleep(0.3)
    gap = watch.largest_gap()
    print(f"{name}: {len(body)} bytes, answered in {took:.2f} s; largest gap {gap*1000:.0f} ms")
    assert status == 400, answer
    error = answer["error"]
    assert error["code"] == code
    assert reason in error["message"]
    assert gap < max_gap, f"a stream stalled {gap * 1000:.0f} ms"


def test_special_token_text_is_tokenized_as_text(stall_server: RunningServer) -> None:
    """A user message full of "</s>" that fits is served; its count is the plain text's."""
    plain = httpx.post(f"{stall_server.api}/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "a</s>b" * 50}], "max_tokens": 2})
    assert plain.status_code == 200, plain.text
    # As text, "</s>" is several tokens; as the special token it would be one.
    assert plain.json()["usage"]["prompt_tokens"] > 50 * 4


