"""`vlserve bench` end to end against the test server (small N), and its argument handling."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RunningServer
from PIL import Image

from server.bench import command
from server.bench.client import auth_headers
from server.bench.runner import server_root
from server.timings import STAGES

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["text", "image", "c=1", "c=2"]


def bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", "bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240, env=env)


def test_bench_writes_table_json_and_chart(server: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = bench("--url", f"{server.url}/api/v1", "-n", "2", "--concurrency", "1,2",
                 "--image-size", "320x240", "--max-tokens", "4", "--out", str(out),
                 "--api-key", "secret-key-123")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout
    header = next(line for line in table.splitlines() if line.lstrip().startswith("text"))
    assert header.split() == SCENARIOS
    for row in ("requests ok/failed", "image_encode", "TTFT (server)", "TTFT (client)",
                "throughput req/s", "tok/s per request"):
        assert row in table
    assert "Bottleneck: " in table
    assert (out / "bench.txt").read_text().strip() == table[: table.index("\nwrote ")].strip()

    data = json.loads((out / "bench.json").read_text())
    assert "secret-key-123" not in (out / "bench.json").read_text()
    assert data["server"]["model"] == "vlserve-demo-llava"
    assert data["server"]["meta"]["n_parallel"] == 2
    assert [s["name"] for s in data["scenarios"]] == SCENARIOS
    assert [len(s["samples"]) for s in data["scenarios"]] == [2, 2, 2, 4]
    for scenario in data["scenarios"]:
        assert scenario["summary"]["errors"] == 0
        assert scenario["summary"]["requests_per_s"] > 0
        for sample in scenario["samples"]:
            assert set(STAGES) <= set(sample["timings"])
            assert 0 < sample["client_ttft_ms"] <= sample["client_total_ms"]
            # Unique prompts and images: nothing but the template's head comes from cache.
            assert sample["timings"]["cached_tokens"] < sample["timings"]["prompt_tokens"] // 2
        if scenario["kind"] == "image":
            assert all(s["timings"]["image_tokens"] == 64 for s in scenario["samples"])
    assert data["verdict"]["bottleneck"]["message"] in table

    png = out / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.width >= 1200 and image.height >= 600


def test_bench_reports_an_unreachable_server(tmp_path: Path) -> None:
    proc = bench("--url", "http://127.0.0.1:9", "-n", "1", "--out", str(tmp_path))
    assert proc.returncode == 1
    assert "cannot reach http://127.0.0.1:9" in proc.stderr
    assert not (tmp_path / "bench.json").exists()


def test_api_key_from_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    monkeypatch.setenv("VLSERVE_API_KEY", "from-env")
    assert command.plan_from(parser.parse_args([])).api_key == "from-env"
    assert command.plan_from(parser.parse_args(["--api-key", "flag"])).api_key == "flag"
    monkeypatch.delenv("VLSERVE_API_KEY")
    assert command.plan_from(parser.parse_args([])).api_key is None
    assert auth_headers("k") == {"Authorization": "Bearer k"}
    assert auth_headers(None) == {}


def test_arguments_are_checked() -> None:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--concurrency", "1,4", "--image-size", "640X480"])
    assert args.concurrency == (1, 4) and args.image_size == (640, 480)
    assert parser.parse_args(["--concurrency", ""]).concurrency == ()
    for bad in (["--concurrency", "0"], ["--image-size", "big"], ["-n", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


@pytest.mark.parametrize("url", ["http://h:7860", "http://h:7860/", "http://h:7860/api/v1",
                                 "http://h:7860/v1/"])
def test_server_root(url: str) -> None:
    assert server_root(url) == "http://h:7860"


def test_soak_command_end_to_end(server: RunningServer, tmp_path: Path) -> None:
    """`vlserve bench soak`, and `python -m bench.soak` the same, on a short run."""
    out = tmp_path / "soak.json"
    proc = bench("soak", "--url", f"{server.url}/api/v1", "--clients", "3", "--duration", "4",
                 "--warmup", "2", "--max-tokens", "4", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "anything else              0" in proc.stdout and proc.stdout.rstrip().endswith("PASS")
    data = json.loads(out.read_text())
    assert data["passed"] and data["counts"]["other"] == 0 and data["sent"] > 0
    assert data["rss_bytes"]["start"] > 0 and data["fds"]["before"] > 0
    same = subprocess.run([sys.executable, "-m", "bench.soak", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert same.returncode == 0 and "--clients" in same.stdout


def test_soak_reports_an_unreachable_server() -> None:
    proc = bench("soak", "--url", "http://127.0.0.1:9", "--duration", "1")
    assert proc.returncode == 2 and "cannot reach" in proc.stderr
