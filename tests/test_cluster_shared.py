"""`vlserve cluster --redis` for real: 2 replicas x 1 thread (tiny demo model) sharing the
cluster's own redis-server, vllm-router behind the nginx front on the cluster's one
address. An upload made through that address is used by sessions on both replicas, and a
response stored on one replica is continued on the other (X-Vlserve-Replica says which)."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis
from conftest import ROOT, free_port
from helpers import photo_bytes, skip_unless_ci

from bench.servers import stop_process
from server.cluster.front import nginx_binary
from server.cluster.state import maxmemory_mb
from server.config import load_settings
from server.demo_model import DemoModelPaths

READY_S = 120.0


@pytest.fixture(scope="module")
def cluster_url(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[str]:
    if nginx_binary() is None or shutil.which("redis-server") is None:
        skip_unless_ci("the fronted cluster needs nginx and redis-server (Debian packages)")
    tmp = tmp_path_factory.mktemp("cluster-shared")
    port = free_port()
    log_path = tmp / "cluster.log"
    cmd = [sys.executable, "-m", "server.cli", "cluster", "--replicas", "2", "--redis",
           "--threads-per-replica", "1", "--port", str(port),
           "--config", str(ROOT / "configs" / "default.yaml"),
           "--model", str(demo_model.text), "--mmproj", str(demo_model.mmproj),
           "--log-dir", str(tmp / "logs"), "--drain-timeout", "10",
           "--replica-env", "VLSERVE_DEFAULT_MAX_TOKENS=4"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_S
        while "cluster ready" not in log_path.read_text(errors="replace"):
            assert process.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")
            time.sleep(0.2)
        assert "front (nginx)" in log_path.read_text()
        _check_redis_bounds(log_path.read_text())
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)  # SIGTERM: the cluster drains and stops all it started
    assert process.returncode == 0, log_path.read_text(errors="replace")
    # Everything it started stopped with it, the redis-server included.
    assert not _children_alive(tmp / "logs")


def _check_redis_bounds(log: str) -> None:
    """The cluster's Redis has vlserve's bounds plus headroom as maxmemory, and noeviction
    (the supervisord group runs it with the same flags: tests/test_cluster_supervisor.py)."""
    url = re.search(r"redis: pid \d+ at (redis://\S+)", log)
    assert url is not None, log
    client = redis.Redis.from_url(url.group(1))
    try:
        settings = load_settings(ROOT / "configs" / "default.yaml")
        assert client.config_get("maxmemory")["maxmemory"] == str(
            maxmemory_mb(settings) * 1024 * 1024)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert client.config_get("save")["save"] == ""
    finally:
        client.close()


def _children_alive(log_dir: Path) -> bool:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return str(log_dir) in ps


def session_per_replica(url: str) -> dict[str, str]:
    """A session id that the router sends to each replica (found by asking)."""
    found: dict[str, str] = {}
    for i in range(40):
        session = f"session-{i}"
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                           headers={"X-Session-ID": session},
                           json={"messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 1})
        assert reply.status_code == 200, reply.text
        found.setdefault(reply.headers["x-vlserve-replica"], session)
        if len(found) == 2:
            return found
    pytest.fail(f"40 sessions all went to {list(found)}")


def test_an_upload_through_the_one_address_serves_sessions_on_both_replicas(
        cluster_url: str) -> None:
    assert_one_upload_serves_both_replicas(cluster_url, seed=3)


def assert_one_upload_serves_both_replicas(url: str, seed: int) -> str:
    """An image uploaded through the cluster's one address (nginx sends it to a replica;
    it lands in the shared store) is used by a session on each replica; its file id."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    uploaded = client.files.create(file=("cat.png", io.BytesIO(photo_bytes(64, 48, seed=seed))),
                                   purpose="vision")
    answered_by = set()
    for replica, session in session_per_replica(url).items():
        raw = client.chat.completions.with_raw_response.create(
            model="m", max_tokens=2, extra_headers={"X-Session-ID": session},
            messages=[{"role": "user", "content": [  # type: ignore[list-item, misc]
                {"type": "text", "text": "What is this?"},
                {"type": "file", "file": {"file_id": uploaded.id}}]}])
        assert raw.headers["x-vlserve-replica"] == replica
        usage = raw.parse().usage
        assert usage is not None and usage.prompt_tokens > 40  # the image's tokens
        answered_by.add(replica)
    assert answered_by == {"r0", "r1"}
    return uploaded.id


def test_a_response_stored_on_one_replica_is_continued_on_the_other(cluster_url: str) -> None:
    client = openai.OpenAI(base_url=f"{cluster_url}/v1", api_key="unused", max_retries=0)
    (first_replica, first), (second_replica, second) = session_per_replica(
        cluster_url).items()
    turn1 = client.responses.with_raw_response.create(
        model="m", input="Remember the word lighthouse.", max_output_tokens=4,
        extra_headers={"X-Session-ID": first})
    assert turn1.headers["x-vlserve-replica"] == first_replica
    turn2 = client.responses.with_raw_response.create(
        model="m", input="What was the word?", max_output_tokens=4,
        previous_response_id=turn1.parse().id, extra_headers={"X-Session-ID": second})
    assert turn2.headers["x-vlserve-replica"] == second_replica != first_replica
    alone = client.responses.create(model="m", input="What was the word?",
                                    max_output_tokens=4, extra_headers={"X-Session-ID": second})
    # The second replica read turn 1 from the shared store: its prompt holds that turn too.
    usage, alone_usage = turn2.parse().usage, alone.usage
    assert usage is not None and alone_usage is not None
    assert usage.input_tokens > alone_usage.input_tokens + 5
