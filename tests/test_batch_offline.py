"""`vlserve batch INPUT -o OUTPUT` (issue 19, Build 5): the model loaded in the command's own
process, or `--url` feeding a running server; answers, failures and a summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import MODEL_NAMES, ROOT, RunningServer
from helpers import data_url, image_message, photo_bytes
from openai.types.chat import ChatCompletion
from test_batches import jsonl, request_line

from server.demo_model import DemoModelPaths


def batch_input(path: Path) -> Path:
    png = photo_bytes(120, 90, seed=3)
    path.write_bytes(jsonl([
        request_line("photo", [image_message("Describe it.", data_url(png))]),
        request_line("hello", [{"role": "user", "content": "Hello"}]),
        request_line("too-many-tokens", [{"role": "user", "content": "x"}], max_tokens=-1),
        "not json at all",
    ]))
    return path


def vlserve_batch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", "batch", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={"VLSERVE_N_THREADS": "1", "PATH": "/usr/bin:/bin"})


def check_results(output: Path, done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 1, done.stderr  # some lines failed
    answers = {json.loads(line)["custom_id"]: json.loads(line)
               for line in output.read_text().splitlines()}
    assert set(answers) == {"photo", "hello"}
    photo = ChatCompletion.model_validate(answers["photo"]["response"]["body"])
    assert photo.model_extra["timings"]["image_tokens"] > 0
    errors_path = output.with_name("out.errors.jsonl")
    errors = {json.loads(line)["custom_id"]: json.loads(line)
              for line in errors_path.read_text().splitlines()}
    assert set(errors) == {"too-many-tokens", None}
    assert errors["too-many-tokens"]["response"]["status_code"] == 400
    assert errors[None]["error"]["message"] == "the line is not valid JSON"
    assert "batch completed: 2 of 4 requests succeeded, 2 failed" in done.stderr
    assert f"failures in {errors_path}" in done.stderr
    assert "  None: the line is not valid JSON" in done.stderr
    assert "4/4 (2 failed)" in done.stderr  # the progress line's last state


def test_offline_batch_on_the_demo_model(demo_model: DemoModelPaths, tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    done = vlserve_batch(str(batch_input(tmp_path / "in.jsonl")), "-o", str(output),
                         "--model", str(demo_model.text), "--mmproj", str(demo_model.mmproj),
                         "--model-name", MODEL_NAMES["llava"], "--n-ctx", "1024")
    check_results(output, done)
    first = json.loads(output.read_text().splitlines()[0])
    assert first["response"]["body"]["model"] == MODEL_NAMES["llava"]


def test_batch_command_feeds_a_running_server(server: RunningServer, tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    done = vlserve_batch(str(batch_input(tmp_path / "in.jsonl")), "-o", str(output),
                         "--url", server.url)
    check_results(output, done)
    # The server ran the batch itself (its runner, its log).
    assert "completed: 2 completed, 2 failed of 4" in server.log()
