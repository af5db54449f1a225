"""What a replica offers the router and the orchestrator, without a running engine: open
probes with API keys on, liveness through a drain, the replica header, the KV share that
counts running requests only; and the cluster command's checks before anything starts."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest
from test_auth import KEY_A, make_app, request

from server.cli import main
from server.cluster import Cluster, ClusterSpec
from server.cluster.child import TAIL_BYTES, Child
from server.cluster.command import add_arguments, spec_from_args
from server.cluster.router import HEALTH_ARGS, router_argv
from server.cluster.state import redis_argv
from server.config import ConfigError
from server.demo_model import DemoModelPaths
from server.engine.jobs import Slot
from server.engine.kv import KvBudget


def test_probes_answer_without_a_key_and_the_rest_still_needs_one(
        demo_model: DemoModelPaths) -> None:
    app = make_app(demo_model, api_keys=[KEY_A])
    live = request(app, "GET", "/livez")
    assert live.status_code == 200 and live.json() == {"status": "alive", "engine": "loading"}
    load = request(app, "GET", "/get_load")
    assert load.status_code == 200 and load.json() == {"load": 0}
    for path in ("/metrics", "/api/v1/models", "/slots", "/api/v1/slots"):
        assert request(app, "GET", path).status_code == 401, path
    open_metrics = make_app(demo_model, api_keys=[KEY_A], metrics_open=True)
    assert request(open_metrics, "GET", "/metrics").status_code == 200


def test_liveness_keeps_answering_while_draining(demo_model: DemoModelPaths) -> None:
    """Readiness turns 503 at SIGTERM so the router stops sending; liveness must not, or
    the orchestrator kills the replica in the middle of finishing its requests."""
    app = make_app(demo_model)
    app.state.vlserve.drain.start()
    assert request(app, "GET", "/health").json() == {"status": "draining"}
    live = request(app, "GET", "/livez")
    assert live.status_code == 200 and live.json()["engine"] == "draining"
    assert request(app, "GET", "/get_load").status_code == 503  # new work is refused


def test_replica_header_names_the_replica_on_every_answer(demo_model: DemoModelPaths) -> None:
    app = make_app(demo_model, replica_id="r7", api_keys=[KEY_A])
    assert request(app, "GET", "/health").headers["x-vlserve-replica"] == "r7"
    assert request(app, "GET", "/api/v1/models").headers["x-vlserve-replica"] == "r7"  # 401
    plain = make_app(demo_model)
    assert "x-vlserve-replica" not in request(plain, "GET", "/health").headers
    with pytest.raises(ConfigError, match="replica_id"):
        make_app(demo_model, replica_id="r 7\r\nX-Evil: 1")


def test_kv_share_counts_running_requests_only() -> None:
    """An idle slot's prefix is dropped the moment a request needs room: not load."""
    idle = Slot(0, cached=list(range(300)))
    running = Slot(1, cached=list(range(100)))
    running.job = object()  # type: ignore[assignment]  (only its presence matters here)
    assert KvBudget.running_cells([idle, running]) == 100
    assert KvBudget.running_cells([idle]) == 0


def test_router_command_line() -> None:
    argv = router_argv(host="0.0.0.0", port=8000, workers=["http://127.0.0.1:1",
                       "http://127.0.0.1:2"], policy="consistent_hash", prometheus_port=9,
                       startup_timeout=60)
    assert argv[argv.index("--worker-urls") + 1:argv.index("--policy")] == [
        "http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert " ".join(HEALTH_ARGS) in " ".join(argv)
    assert argv[argv.index("--health-check-interval-secs") + 1] == "1"
    assert argv[argv.index("--prometheus-port") + 1] == "9"  # not its default 29000
    with pytest.raises(ConfigError, match="at least 2 replicas"):
        router_argv(host="h", port=1, workers=["http://a"], policy="power_of_two",
                    prometheus_port=9, startup_timeout=1)


def test_missing_router_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["cluster", "--replicas", "2", "--port", "1"]) == 2
    assert "pip install 'vlserve[cluster]'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--replica-env", "NOEQUALS"], "--replica-env wants NAME=VALUE"),
    (["--replicas", "0"], "--replicas must be at least 1"),
    (["--redis", "--redis-maxmemory", "0"], "--redis-maxmemory must be at least 1"),
    (["--config", "/no/such.yaml"], "config file not found"),
])
def test_cluster_arguments_are_checked_before_anything_starts(
        args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cluster", *args]) == 2
    assert message in capsys.readouterr().err


def test_replicas_get_their_own_gpu_threads_and_id(tmp_path: Path) -> None:
    """What each replica is started with (nothing is started here)."""
    cluster = Cluster(ClusterSpec(replicas=3, gpus=("0", "1"), threads_per_replica=2,
                                  replica_env={"VLSERVE_N_PARALLEL": "8"}, log_dir=tmp_path))
    envs = [replica.env for replica in cluster.replicas]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0"]
    assert [e["VLSERVE_REPLICA_ID"] for e in envs] == ["r0", "r1", "r2"]
    assert {e["VLSERVE_N_THREADS"] for e in envs} == {e["OMP_NUM_THREADS"] for e in envs} == {"2"}
    assert all(e["VLSERVE_N_PARALLEL"] == "8" for e in envs)
    ports = [int(r.argv[r.argv.index("--port") + 1]) for r in cluster.replicas]
    assert cluster.replica_urls() == [f"http://127.0.0.1:{port}" for port in ports]
    assert all(r.argv[r.argv.index("--host") + 1] == "127.0.0.1" for r in cluster.replicas)
    plain = Cluster(ClusterSpec(replicas=1, log_dir=tmp_path))
    assert plain.replicas[0].env.get("CUDA_VISIBLE_DEVICES") == os.environ.get(
        "CUDA_VISIBLE_DEVICES")  # inherited, not set


def test_replicas_without_a_shared_store_keep_their_batches_apart(tmp_path: Path) -> None:
    """One batch_dir for all would have every replica run every batch: without shared
    state each gets its own folder under the configured one; with Redis they share the
    store (the lease picks who runs a batch) and keep the configured setting."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    spec = spec_from_args(parser.parse_args(
        ["--replicas", "2", "--replica-env", f"VLSERVE_BATCH_DIR={tmp_path}/b"]))
    envs = [replica.env for replica in Cluster(spec).replicas]
    assert [e["VLSERVE_BATCH_DIR"] for e in envs] == [f"{tmp_path}/b/r0", f"{tmp_path}/b/r1"]
    shared = Cluster(ClusterSpec(replicas=2, state_url="redis://127.0.0.1:1/0",
                                 replica_env={"VLSERVE_BATCH_DIR": f"{tmp_path}/b"}))
    assert {r.env["VLSERVE_BATCH_DIR"] for r in shared.replicas} == {f"{tmp_path}/b"}


def test_replicas_without_a_shared_store_keep_their_snapshots_apart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Docker image names one snapshot file in the environment (a preset or
    --replica-env may too): each replica writes its own beside it (one file for all would
    be claimed by one replica, the others keeping none)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setenv("VLSERVE_STATE_SNAPSHOT", f"{tmp_path}/state.json")
    envs = [replica.env for replica in Cluster(spec_from_args(parser.parse_args(
        ["--replicas", "2"]))).replicas]
    assert [e["VLSERVE_STATE_SNAPSHOT"] for e in envs] == [
        f"{tmp_path}/state.r0.json", f"{tmp_path}/state.r1.json"]
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"state_snapshot: {tmp_path}/kept.json\n")
    monkeypatch.delenv("VLSERVE_STATE_SNAPSHOT")
    spec = spec_from_args(parser.parse_args(["--replicas", "2", "--config", str(preset)]))
    assert [r.env["VLSERVE_STATE_SNAPSHOT"] for r in Cluster(spec).replicas] == [
        f"{tmp_path}/kept.r0.json", f"{tmp_path}/kept.r1.json"]
    shared = Cluster(ClusterSpec(replicas=2, state_url="redis://127.0.0.1:1/0",
                                 state_snapshot=tmp_path / "state.json"))
    assert all("VLSERVE_STATE_SNAPSHOT" not in r.env or r.env["VLSERVE_STATE_SNAPSHOT"]
               != f"{tmp_path}/state.r0.json" for r in shared.replicas)  # Redis keeps them


@pytest.mark.parametrize("args, maxmemory", [
    # The default bounds: uploads + stored responses + conversations + stored chat
    # completions + batch files (1 GiB in Redis) + headroom.
    ([], 512 + 256 + 256 + 256 + 1024 + 256),
    (["--replica-env", "VLSERVE_UPLOAD_STORE_MB=2048"], 2048 + 256 + 256 + 256 + 1024 + 256),
    (["--replica-env", "VLSERVE_BATCH_STORE_MB=100"], 512 + 256 + 256 + 256 + 100 + 256),
    (["--redis-maxmemory", "4096"], 4096),
])
def test_the_cluster_redis_is_sized_from_the_replicas_bounds(args: list[str],
                                                               maxmemory: int) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    spec = spec_from_args(parser.parse_args(["--redis", *args]))
    assert spec.redis_maxmemory_mb == maxmemory
    assert redis_argv(1, Path("/w"), spec.redis_maxmemory_mb, binary="redis-server")[-4:] == [
        "--maxmemory", f"{maxmemory}mb", "--maxmemory-policy", "noeviction"]


def test_a_childs_log_tail_reads_only_the_end_of_its_log(tmp_path: Path) -> None:
    """A replica failing to start after a year of logging: its last lines, without reading
    the whole file into the cluster process."""
    child = Child("r0", ["true"], {}, tmp_path)
    with (tmp_path / "r0.log").open("wb") as log:
        log.write(b"old line\n" * (TAIL_BYTES // 4))  # four times what is read
        log.write(b"\xff not utf-8\nloading model\nerror: model file not found\n")
    assert child.log_tail(2) == "\n  loading model\n  error: model file not found"
    assert len(child.log_tail(10**6)) < 2 * TAIL_BYTES  # the end only, not all four times
    assert Child("r1", ["true"], {}, tmp_path).log_tail() == ""  # no log yet
