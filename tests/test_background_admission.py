"""Background responses on a busy server (one slot, a queue of two, the LLaVA demo model):
they wait `queued` for room instead of failing on a full queue, go to the engine only while
its queue is at most half full (so a client's request still finds room; their order:
tests/test_background_runs.py), and past `background_max_runs_per_key` creating one is a
429."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server
from openai.types.responses import Response
from test_responses_background import until_done

from server.demo_model import DemoModelPaths

OCCUPY = 8000  # tokens: seconds of the only slot on the tiny model, ended by hanging up
PER_KEY = 4


@pytest.fixture(scope="module")
def busy_server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[RunningServer]:
    running = start_server(
        demo_model, tmp_path_factory.mktemp("background") / "server.log",
        "--n-parallel", "1", "--n-ctx", "8192",
        env={"VLSERVE_MAX_QUEUE": "2", "VLSERVE_MAX_TOKENS_CAP": str(OCCUPY),
             "VLSERVE_BACKGROUND_MAX_RUNS_PER_KEY": str(PER_KEY)})
    yield running
    stop_server(running)


def create(server: RunningServer, **body: object) -> httpx.Response:
    return httpx.post(f"{server.api}/responses", timeout=60, json={
        "model": "m", "input": "Say something.", "max_output_tokens": 3, "temperature": 0,
        "background": True, **body})


def status_of(server: RunningServer, response_id: str) -> str:
    return httpx.get(f"{server.api}/responses/{response_id}", timeout=60).json()["status"]


def ask_in_thread(server: RunningServer, answered: list[httpx.Response]) -> threading.Thread:
    """A client's short chat request, answered into `answered` once the slot is free."""
    asked = threading.Thread(target=lambda: answered.append(httpx.post(
        f"{server.api}/chat/completions", timeout=120, json={
            "model": "m", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2})))
    asked.start()
    return asked


def wait_queued(server: RunningServer, depth: int) -> None:
    deadline = time.monotonic() + 10
    while queue_depth(server) < depth:
        assert time.monotonic() < deadline, "the request never reached the queue"
        time.sleep(0.01)


def queue_depth(server: RunningServer) -> int:
    return httpx.get(f"{server.api}/slots", timeout=10).json()["queue_depth"]


def test_background_runs_wait_their_turn_and_leave_room_for_requests(
        busy_server: RunningServer) -> None:
    server = busy_server
    occupier = {"model": "m", "messages": [{"role": "user", "content": "Go on."}],
                "max_tokens": OCCUPY, "temperature": 0, "stream": True}
    answered: list[httpx.Response] = []
    with httpx.stream("POST", f"{server.api}/chat/completions", json=occupier,
                      timeout=60) as stream:
        lines = stream.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)  # it holds the only slot from here on
        first = ask_in_thread(server, answered)
        wait_queued(server, 1)  # the queue (of two) is half full

        answers = [create(server) for _ in range(PER_KEY)]
        assert [a.status_code for a in answers] == [200] * PER_KEY, [a.text for a in answers]
        ids = [Response.model_validate(a.json()).id for a in answers]
        # A full queue would have failed them at once: all of them wait instead ...
        assert [status_of(server, i) for i in ids] == ["queued"] * PER_KEY
        # ... outside the engine's queue while it is half full, so that the next client's
        # request still finds room (with a background run in it, this one would be a 429).
        assert queue_depth(server) == 1
        second = ask_in_thread(server, answered)
        wait_queued(server, 2)

        over = create(server)
        assert over.status_code == 429, over.text
        assert over.json()["error"]["code"] == "too_many_background_responses"
        assert over.json()["error"]["param"] == "background" and "Retry-After" in over.headers

        # Cancelled while it waits in line: it ends at once, it never ran.
        cancelled = httpx.post(f"{server.api}/responses/{ids[-1]}/cancel", timeout=30)
        assert cancelled.json()["status"] == "cancelled", cancelled.text
        assert Response.model_validate(cancelled.json()).usage is None
        busy = httpx.get(f"{server.api}/slots", timeout=10).json()
        assert busy["busy_slots"] == 1, "the occupier ended before the checks were done"
    # The occupier's client left: the slot frees, and everything waiting gets its turn.
    first.join(120)
    second.join(120)
    assert [a.status_code for a in answered] == [200, 200], [a.text for a in answered]
    ended = [until_done(server, i) for i in ids[:-1]]
    assert [r.status for r in ended] == ["incomplete"] * (PER_KEY - 1), ended
    assert all(r.usage is not None and r.usage.output_tokens == 3 for r in ended)
    assert create(server).status_code == 200  # room again for this key
