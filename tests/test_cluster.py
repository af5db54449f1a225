"""`vlserve cluster` run for real: 2 replicas x 1 thread on the tiny demo model behind the
real vllm-router, reached over loopback HTTP. One cluster for the module (its last test
stops it); the round_robin baseline is a second router in front of the same replicas.

Which replica answered is the X-Vlserve-Replica header each replica adds (r0, r1); replica
pids come from the cluster's own log lines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, free_port
from helpers import data_url, image_message, photo_bytes, wait_until
from prometheus_client.parser import text_string_to_metric_families

from server.cluster.child import Child, child_env
from server.cluster.router import router_argv
from server.demo_model import DemoModelPaths

N_CTX = 8192
LONG = 6000  # tokens: a stream that is still running when the test acts on it
READY_S = 120.0
PROBE_S = 4.0  # seconds of requests sent after a kill -9
# The cluster's log line once it has taken a dead replica out of the router's list.
NOTICED = "replica {victim}: out of the router's list"


@dataclass
class LocalCluster:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_dir: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def replicas(self) -> dict[str, tuple[int, str]]:
        """Each replica's latest (pid, url), from the cluster's log."""
        found = re.findall(r"replica (r\d+): pid (\d+) on (http://\S+)", self.log())
        return {name: (int(pid), url) for name, pid, url in found}

    def workers(self) -> dict[str, bool]:
        listed = httpx.get(f"{self.url}/workers", timeout=5).json()["workers"]
        return {w["url"]: w["is_healthy"] for w in listed}


def wait_for(what: str, check: Callable[[], bool], cluster: LocalCluster,
             timeout: float = 60.0) -> None:
    wait_until(what, check, cluster.process, cluster.log, "the cluster", timeout)


@pytest.fixture(scope="module")
def cluster(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "cluster", "--replicas", "2",
           "--threads-per-replica", "1", "--port", str(port),
           "--config", str(ROOT / "configs" / "default.yaml"),
           "--model", str(demo_model.text), "--mmproj", str(demo_model.mmproj),
           "--log-dir", str(tmp / "logs"), "--drain-timeout", "20",
           "--replica-env", f"VLSERVE_N_CTX={N_CTX}",
           "--replica-env", f"VLSERVE_MAX_TOKENS_CAP={LONG}",
           "--replica-env", "VLSERVE_DEFAULT_MAX_TOKENS=8"]
    log_path = tmp / "cluster.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    running = LocalCluster(f"http://127.0.0.1:{port}", process, log_path, tmp / "logs")
    try:
        wait_for("cluster ready", lambda: "cluster ready" in running.log(), running, READY_S)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ---------- multi-turn image sessions ----------

def chat(url: str, messages: list[dict], session: str | None, max_tokens: int = 8
         ) -> tuple[dict, str]:
    headers = {"X-Session-ID": session} if session else {}
    answer = httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=120, json={
        "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    assert answer.status_code == 200, answer.text
    return answer.json(), answer.headers["x-vlserve-replica"]


@dataclass
class Turn:
    replica: str
    prompt_tokens: int
    cached_tokens: int


def run_sessions(url: str, tag: str, sessions: int = 4, turns: int = 3,
                 in_step: bool = True) -> list[list[Turn]]:
    """Each session: an image question, then follow-ups re-sending the whole chat. In step:
    all sessions' first turns together, then their second turns (as concurrent users do);
    else one session after another."""
    seed = zlib.crc32(tag.encode()) % 1000
    chats = [[image_message(f"Session {tag}-{i}: what is in this picture?",
                            data_url(photo_bytes(96, 64, seed=seed + i)))]
             for i in range(sessions)]
    record: list[list[Turn]] = [[] for _ in range(sessions)]

    def one(i: int) -> None:
        body, replica = chat(url, chats[i], f"{tag}-{i}")
        cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
        record[i].append(Turn(replica, body["usage"]["prompt_tokens"], cached))
        chats[i] += [{"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                     {"role": "user", "content": f"Turn {len(record[i]) + 1}: and then?"}]

    if in_step:
        with ThreadPoolExecutor(sessions) as pool:
            for _ in range(turns):
                list(pool.map(one, range(sessions)))
    else:
        for i in range(sessions):
            for _ in range(turns):
                one(i)
    return record


def prefix_hits(turns: list[Turn]) -> list[bool]:
    """Per follow-up turn: did its cached tokens cover the whole previous prompt?"""
    return [now.cached_tokens >= before.prompt_tokens for before, now in pairwise(turns)]


def test_sessions_stay_on_one_replica_and_reuse_their_prefix(cluster: LocalCluster) -> None:
    record = run_sessions(cluster.url, "sticky")
    for turns in record:
        assert len({t.replica for t in turns}) == 1, turns
        assert prefix_hits(turns) == [True, True], turns
        assert turns[0].cached_tokens < turns[0].prompt_tokens // 2  # a new image: no hit


@pytest.fixture
def round_robin(cluster: LocalCluster, tmp_path: Path) -> Iterator[str]:
    """A second vllm-router, round_robin, in front of the same two replicas."""
    port = free_port()
    workers = sorted(url for _, url in cluster.replicas().values())
    router = Child("router-rr", router_argv(
        host="127.0.0.1", port=port, workers=workers, policy="round_robin",
        prometheus_port=free_port(), startup_timeout=60), child_env({}), tmp_path)
    router.start()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for("the round_robin router", ready, cluster)
        yield url
    finally:
        router.signal(signal.SIGTERM)
        router.wait(10)


def test_round_robin_baseline_loses_the_prefix(round_robin: str) -> None:
    # One session after another: the router alternates, so every second turn lands on the
    # replica that has never seen that session.
    record = run_sessions(round_robin, "rr", in_step=False)
    for turns in record:
        assert len({t.replica for t in turns}) == 2, turns
        assert prefix_hits(turns)[0] is False, turns


# ---------- failures ----------

def test_an_unhealthy_replica_gets_no_new_sessions(cluster: LocalCluster) -> None:
    """A frozen replica (SIGSTOP: /health stops answering) is dropped by the router within
    seconds, and every new session goes to the other one."""
    replicas = cluster.replicas()
    pid, url = replicas["r1"]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for("the router to mark r1 unhealthy", lambda: not cluster.workers()[url],
                 cluster, timeout=30)
        for i in range(6):
            _, replica = chat(cluster.url, [{"role": "user", "content": f"New {i}"}],
                              f"while-r1-frozen-{i}")
            assert replica == "r0"
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for("r1 healthy again", lambda: all(cluster.workers().values()), cluster, timeout=30)


class LongStream:
    """A streamed chat through the router, read in a thread: which replica, how it ended."""

    def __init__(self, url: str, session: str, max_tokens: int = LONG) -> None:
        self.replica: str | None = None
        self.events: list[str] = []
        self.error: Exception | None = None
        self.started = threading.Event()
        self._hang_up = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, session, max_tokens),
                                        daemon=True)
        self._thread.start()

    def _run(self, url: str, session: str, max_tokens: int) -> None:
        body = {"messages": [{"role": "user", "content": "Go on and on."}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}  # long on purpose: an early EOS would end it
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120,
                              headers={"X-Session-ID": session}) as answer:
                self.replica = answer.headers.get("x-vlserve-replica")
                for line in answer.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        if len(self.events) >= 3:
                            self.started.set()
                    if self._hang_up.is_set():
                        break  # closes the connection: the replica cancels the request
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.started.set()

    def request_hang_up(self) -> None:
        """Hang up at the next line (a stream still waiting for a slot sends none)."""
        self._hang_up.set()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream hung"


def metrics(url: str) -> dict[str, list]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {f.name: (f.type, [s.value for s in f.samples])
            for f in text_string_to_metric_families(text)}


def test_metrics_contract_and_get_load(cluster: LocalCluster) -> None:
    """The three gauges a load-aware router reads: one series each; KV usage counts only
    what running requests hold, so an idle replica with cached prefixes reads 0."""
    _, url = cluster.replicas()["r0"]
    gauges = ("vlserve_num_requests_waiting", "vlserve_num_requests_running",
              "vlserve_kv_cache_usage_ratio")
    idle = metrics(url)
    for name in gauges:
        assert idle[name] == ("gauge", [0.0]), name
    assert idle["vlserve_kv_cells_used"][1][0] > 0  # earlier tests left reusable prefixes
    assert httpx.get(f"{url}/get_load", timeout=5).json() == {"load": 0}

    # Four slots: five streams keep four running and one waiting.
    streams = [LongStream(url, f"load-{i}") for i in range(5)]
    try:
        def busy() -> bool:
            now = metrics(url)
            return (now["vlserve_num_requests_running"][1], now["vlserve_num_requests_waiting"]
                    [1]) == ([4.0], [1.0])

        wait_for("4 running and 1 waiting", busy, cluster, timeout=30)
        assert httpx.get(f"{url}/get_load", timeout=5).json()["load"] == 5
        ratio = metrics(url)["vlserve_kv_cache_usage_ratio"]
        assert ratio[0] == "gauge" and len(ratio[1]) == 1 and 0.0 < ratio[1][0] <= 1.0
    finally:
        # All at once: the one waiting (any of the five, by arrival) sends nothing, so it
        # can only notice its hang-up once the running ones have freed a slot.
        for stream in streams:
            stream.request_hang_up()
        for stream in streams:
            stream.join(30)


@dataclass
class Probe:
    started: float  # monotonic
    status: int  # 0: no HTTP answer
    text: str
    took: float = 0.0


class Prober:
    """Chats sent back to back from two threads, cycling over sessions, each recorded with
    the time it started: what clients see in the seconds after a replica dies."""

    def __init__(self, url: str, sessions: list[str], seconds: float) -> None:
        self.probes: list[Probe] = []
        self._until = time.monotonic() + seconds
        self._threads = [threading.Thread(target=self._run, args=(url, sessions[i::2]),
                                          daemon=True) for i in range(2)]
        for thread in self._threads:
            thread.start()

    def _run(self, url: str, sessions: list[str]) -> None:
        i = 0
        while time.monotonic() < self._until:
            started = time.monotonic()
            try:
                answer = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                                    headers={"X-Session-ID": sessions[i % len(sessions)]},
                                    json={"messages": [{"role": "user", "content": "There?"}],
                                          "max_tokens": 2})
                self.probes.append(Probe(started, answer.status_code, answer.text[:200],
                                         time.monotonic() - started))
            except httpx.HTTPError as exc:
                self.probes.append(Probe(started, 0, repr(exc), time.monotonic() - started))
            i += 1

    def join(self) -> list[Probe]:
        for thread in self._threads:
            thread.join(60)
        return sorted(self.probes, key=lambda p: p.started)


def test_kill_9_of_a_replica(cluster: LocalCluster) -> None:
    """The stream on the killed replica ends (an error or a cut, never a hang); the cluster
    takes the dead replica out of the router's list at once, so every request sent after
    that succeeds; it starts a new process on the same port and puts it back in the list."""
    stream = LongStream(cluster.url, "victim")
    assert stream.started.wait(60) and stream.error is None, stream.error
    victim = stream.replica
    assert victim in ("r0", "r1")
    pid, url = cluster.replicas()[victim]
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # Sessions on both replicas, the victim's own among them (it is on the dead one).
    prober = Prober(cluster.url, ["victim", *(f"after-kill-{i}" for i in range(5))],
                    PROBE_S)
    noticed = NOTICED.format(victim=victim)
    wait_for("the death noticed", lambda: noticed in cluster.log(), cluster, timeout=15)
    noticed_at = time.monotonic()  # the log line was written before this: a safe bound
    stream.join(30)
    assert '[DONE]' not in stream.events  # cut short, and the client can tell
    probes = prober.join()
    failed = [p for p in probes if p.status != 200]
    late = [p for p in failed if p.started > noticed_at]
    print(f"\nkill -9: noticed after {noticed_at - killed_at:.2f} s; {len(probes)} requests "
          f"in {PROBE_S:.0f} s, {len(failed)} failed "
          f"({len(late)} started after the death was noticed): "
          f"{sorted({(p.status, p.text[:80]) for p in failed})} at "
          f"{[(round(p.started - killed_at, 2), round(p.took, 2)) for p in failed]}")
    assert noticed_at - killed_at < 5, noticed_at - killed_at
    assert not late, [(round(p.started - killed_at, 2), p.status, p.text) for p in late]
    assert sum(p.started > noticed_at for p in probes) >= 2  # the check had requests

    wait_for("the replacement", lambda: cluster.replicas()[victim][0] != pid, cluster)
    assert cluster.replicas()[victim][1] == url  # same port: the router's list stays right
    assert f"{victim} (pid {pid}) exited with signal 9: restarting it" in cluster.log()
    wait_for("the replacement back in the router's list",
             lambda: f"replica {victim}: back in the router's list" in cluster.log(), cluster)
    assert cluster.workers() == {u: True for _, u in cluster.replicas().values()}

    def serves_again() -> bool:  # new sessions reach it, not just its health checks
        return victim in {chat(cluster.url, [{"role": "user", "content": "Hi"}],
                               f"back-{i}-{time.monotonic()}", 2)[1] for i in range(8)}

    wait_for("the replacement to get sessions", serves_again, cluster, timeout=30)


def test_sigterm_drains_then_stops_everything(cluster: LocalCluster) -> None:
    """Last in the module: it stops the cluster. A stream in flight finishes whole."""
    stream = LongStream(cluster.url, "drain", max_tokens=3000)
    assert stream.started.wait(60) and stream.error is None, stream.error
    children = [pid for pid, _ in cluster.replicas().values()]
    children += [int(p) for p in re.findall(r"router: pid (\d+)", cluster.log())[-1:]]
    assert not stream.done  # still streaming when the cluster is told to stop
    cluster.process.send_signal(signal.SIGTERM)
    stream.join(90)
    assert stream.error is None and stream.events[-1] == "[DONE]"
    assert json.loads(stream.events[-2])["choices"][0]["finish_reason"] == "length"
    assert cluster.process.wait(timeout=90) == 0, cluster.log()
    assert "draining the replicas, then stopping the router" in cluster.log()
    assert "cluster stopped" in cluster.log()
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
