"""`vlserve doctor`: passes on the demo model through the real engine, and fails with one
line per problem and a non-zero exit on a missing file, a wrong sha256, a projector type this
llama.cpp does not know, and GPU layers asked of a CPU-only build."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from conftest import ROOT
from gguf import GGUFReader

from server.demo_model import DemoModelPaths

CHECKS = ["build", "gpus", "threads", "files", "sha256", "gguf", "template", "engine"]


def doctor(models: DemoModelPaths, registry: Path, *extra: str,
           mmproj: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "server.cli", "doctor", "--model", str(models.text),
           "--mmproj", str(mmproj or models.mmproj), "--registry", str(registry), *extra]
    # No VLSERVE_* from outside (e.g. VLSERVE_REGISTRY); one llama.cpp thread, as the test
    # servers use (see conftest.start_server).
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLSERVE_")}
    env["VLSERVE_N_THREADS"] = "1"
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def write_registry(path: Path, models: DemoModelPaths, *, model_sha: str | None,
                   mmproj_sha: str | None, mmproj_name: str | None = None) -> Path:
    entry = {"title": "demo", "repo": "vlserve/demo", "dir": "demo", "files": {
        "model": {"name": models.text.name, "quant": "F32", "sha256": model_sha},
        "mmproj": {"name": mmproj_name or models.mmproj.name, "quant": "F32",
                   "sha256": mmproj_sha}}}
    path.write_text(yaml.safe_dump({"models": {"demo": entry}}))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def problems(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("vlserve doctor: ")]


def test_doctor_passes_on_the_demo_model(demo_model: DemoModelPaths, tmp_path: Path) -> None:
    registry = write_registry(tmp_path / "registry.yaml", demo_model,
                              model_sha=sha256(demo_model.text), mmproj_sha=None)
    result = doctor(demo_model, registry, "--json")
    assert result.returncode == 0, result.stderr
    assert problems(result) == []
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["problems"] == []
    checks = {c["name"]: c for c in report["checks"]}
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert {c["status"] for c in report["checks"]} == {"ok"}

    build = checks["build"]["details"]
    assert build["llama_cpp_python"] == "0.3.36" and build["backends"] == ["CPU"]
    assert checks["build"]["summary"].startswith(
        f"llama-cpp-python 0.3.36 (llama.cpp {build['llama_cpp']}); backends CPU; no GPU device")
    assert build["gpu_offload"] is False and build["features"]["CPU"]  # CPU feature flags
    assert checks["threads"]["details"]["n_threads"] == 1  # VLSERVE_N_THREADS
    assert checks["sha256"]["summary"] == "files match registry entry demo (mmproj not " \
        "pinned in the registry)"
    assert checks["sha256"]["details"]["model"]["sha256"] == sha256(demo_model.text)
    assert checks["gguf"]["details"] == {"architecture": "llama", "projector_type": "mlp"}
    assert checks["template"]["details"]["source"] == "gguf"  # the demo GGUF carries its own

    engine = checks["engine"]["details"]
    assert engine["placement"]["llm_device"] == "CPU"
    assert engine["placement"]["projector_device"] == "CPU"
    assert engine["stage_ran_on"]["image_encode"] == "CPU"
    assert engine["warnings"] == []
    text, image = engine["text"], engine["image"]
    assert text["completion_tokens"] > 0 and text["image_encode"] == 0
    assert image["image_tokens"] == 64  # the demo CLIP: (112 / 14) ** 2 patches
    assert image["image_decode"] > 0 and image["image_encode"] > 0 and image["total"] > 0


def test_missing_file(demo_model: DemoModelPaths, tmp_path: Path) -> None:
    missing = tmp_path / "nope-mmproj.gguf"
    result = doctor(demo_model, tmp_path / "no-registry.yaml", mmproj=missing)
    assert result.returncode == 1
    assert problems(result) == [f"vlserve doctor: files: mmproj file not found: {missing} "
                                "(download it with `vlserve download NAME`, or point "
                                "--model/--mmproj at existing files)"]
    # A registry entry that names the files: the hint names the entry.
    registry = write_registry(tmp_path / "registry.yaml", demo_model, model_sha=None,
                              mmproj_sha=None, mmproj_name=missing.name)
    (problem,) = problems(doctor(demo_model, registry, mmproj=missing))
    assert "(download it with `vlserve download demo`, or point" in problem
    lines = result.stdout.splitlines()
    assert any(line.startswith("FAIL  files ") for line in lines)
    assert any(line.startswith("SKIP  engine ") and "model files missing" in line
               for line in lines)
    assert lines[-1] == "1 problem(s)"


def test_wrong_sha256(demo_model: DemoModelPaths, tmp_path: Path) -> None:
    wrong = "0" * 64
    registry = write_registry(tmp_path / "registry.yaml", demo_model, model_sha=wrong,
                              mmproj_sha=sha256(demo_model.mmproj))
    result = doctor(demo_model, registry, "--no-engine")
    assert result.returncode == 1
    (problem,) = problems(result)
    assert problem == (f"vlserve doctor: sha256: model {demo_model.text.name}: sha256 "
                       f"mismatch with registry entry demo (expected {wrong}, file has "
                       f"{sha256(demo_model.text)}); download it again: vlserve download "
                       "demo --force")


def test_unsupported_projector_type(demo_model: DemoModelPaths, tmp_path: Path) -> None:
    mmproj = tmp_path / "unknown-mmproj.gguf"
    shutil.copy(demo_model.mmproj, mmproj)
    set_projector_type(mmproj, b"zzz")  # same length as "mlp": rewritten in place
    result = doctor(demo_model, tmp_path / "no-registry.yaml", "--json", mmproj=mmproj)
    assert result.returncode == 1
    assert problems(result) == [
        f"vlserve doctor: gguf: projector type 'zzz' in {mmproj.name} is not supported by "
        "llama.cpp in llama-cpp-python 0.3.36 (known types: server/engine/supported.py); "
        "serve a supported family instead (`vlserve models` lists the registry's, with their "
        "status)"]
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["engine"] == {"name": "engine", "status": "skip", "details": {},
                                "summary": "this build cannot load the model"}


def test_gpu_layers_on_a_cpu_build(demo_model: DemoModelPaths, tmp_path: Path) -> None:
    """The engine loads and answers, but doctor fails: the settings ask for a GPU this build
    cannot use, and the one line names the rebuild."""
    result = doctor(demo_model, tmp_path / "no-registry.yaml", "--n-gpu-layers", "-1")
    assert result.returncode == 1
    (problem,) = problems(result)
    assert problem.startswith("vlserve doctor: engine: n_gpu_layers is -1 but this llama.cpp "
                              "build has no GPU backend, so every layer runs on the CPU")
    assert 'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir ' \
        "llama-cpp-python==0.3.36" in problem
    assert "image: " in result.stdout  # the requests still ran, with their timings


def set_projector_type(path: Path, value: bytes) -> None:
    reader = GGUFReader(path, "r+")
    field = reader.fields["clip.projector_type"]
    text = field.parts[field.data[0]]
    assert len(text) == len(value)
    text[:] = np.frombuffer(value, dtype=np.uint8)
    del reader  # the memmap writes through on close

