"""llama.cpp's default thread count comes from the cores this process may use (its affinity
mask, a cgroup CPU quota such as docker --cpus), not from the machine's: a thread per host
core in a container given a few of them makes llama.cpp's barrier-synchronised threads
wait a scheduler slice for each other at every operation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.cluster.cluster import ClusterSpec
from server.cpus import usable_cores
from server.demo_model import DemoModelPaths

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def two_cores() -> list[int]:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs a machine with two cores to pin a process to one of them")
    return cores


def pinned(core: int) -> None:
    os.sched_setaffinity(0, {core})


def test_a_process_pinned_to_one_core_counts_one(two_cores: list[int]) -> None:
    code = "from server.cpus import usable_cores; c = usable_cores(); print(c.machine, c.usable)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, preexec_fn=lambda: pinned(two_cores[0]))
    assert out.stdout.split() == [str(os.cpu_count()), "1"]
    assert usable_cores().usable == len(two_cores)


def test_cluster_replicas_share_the_usable_cores(two_cores: list[int]) -> None:
    spec = ClusterSpec(replicas=1)
    assert spec.threads() == len(two_cores)
    pinned(two_cores[0])
    try:
        assert spec.threads() == 1
    finally:
        os.sched_setaffinity(0, set(two_cores))


def doctor_threads(models: DemoModelPaths, n_threads: int, core: int | None
                   ) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLSERVE_")}
    env["VLSERVE_N_THREADS"] = str(n_threads)
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "doctor", "--model", str(models.text),
         "--mmproj", str(models.mmproj), "--no-engine", "--json"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120,
        preexec_fn=None if core is None else lambda: pinned(core))
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    return checks["threads"]


def test_doctor_fails_threads_beyond_the_usable_cores(demo_model: DemoModelPaths,
                                                      two_cores: list[int]) -> None:
    fine = doctor_threads(demo_model, len(two_cores), None)
    assert fine["status"] == "ok", fine
    over = doctor_threads(demo_model, len(two_cores), two_cores[0])
    assert over["status"] == "fail", over
    assert f"n_threads is {len(two_cores)} but this process may use 1 core" in over["summary"]
    default = doctor_threads(demo_model, 0, two_cores[0])
    assert default["status"] == "ok" and default["details"]["n_threads"] == 1, default


def test_the_server_warns_of_threads_beyond_the_usable_cores(
        demo_model: DemoModelPaths, caplog: pytest.LogCaptureFixture) -> None:
    from server.config import load_settings
    from server.engine.model import load_model

    too_many = usable_cores().usable + 1
    loaded = load_model(load_settings(None, model=demo_model.text, mmproj=demo_model.mmproj,
                                      n_threads=too_many, n_parallel=1))
    try:
        assert loaded.info["n_threads"] == too_many  # as asked, with a warning in the log
    finally:
        loaded.close()
    assert f"n_threads is {too_many} but this process may use" in caplog.text
