"""Session fixtures: the tiny demo model, generated once, and a real server on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.servers import free_port, stop_process
from server.demo_model import DemoModelPaths, make_demo_model

pytest_plugins = ["redis_fixture"]  # `redis`: a redis-server per module

ROOT = Path(__file__).resolve().parent.parent

# The test server's limits, chosen so the limit tests are cheap.
TEST_N_CTX = 1024
TEST_DEFAULT_MAX_TOKENS = 24
TEST_MAX_TOKENS_CAP = 40
LONG_TOKENS = 3000  # long_server's cap


# The served demo model families, and the name each test server serves its model under.
FAMILIES: tuple[str, ...] = ("llava", "youtu-vl", "glm4v")
MODEL_NAMES = {"llava": "vlserve-demo-llava", "youtu-vl": "vlserve-demo-youtu-vl",
               "glm4v": "vlserve-demo-glm4v",
               "qwen2vl": "vlserve-demo-qwen2vl",  # tests/test_generic_sizing.py only
               "gemma": "gemma-3-270m"}  # the real text-only model (tests/test_real_model.py)
# Each family's session fixtures: its generated model files, and its 2-slot server.
MODEL_FIXTURES = {"llava": "demo_model", "youtu-vl": "youtu_model", "glm4v": "glm4v_model"}
SERVER_FIXTURES = {"llava": "llava_server", "youtu-vl": "youtu_server", "glm4v": "glm4v_server"}


@dataclass(frozen=True)
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    log_path: Path
    models: DemoModelPaths | Path  # a Path: one text-only GGUF
    family: str = "llava"

    @property
    def model_name(self) -> str:
        return MODEL_NAMES[self.family]

    @property
    def api(self) -> str:
        return f"{self.url}/api/v1"

    def log(self) -> str:
        """The server's output so far, up to its last whole line while it runs: a line
        being written when the file is read would otherwise end cut (and not parse)."""
        text = self.log_path.read_text(errors="replace")
        if self.process.poll() is not None:
            return text
        return text[: text.rfind("\n") + 1]


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> DemoModelPaths:
    return make_demo_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def youtu_model(tmp_path_factory: pytest.TempPathFactory) -> DemoModelPaths:
    return make_demo_model(tmp_path_factory.mktemp("youtu-models"), family="youtu-vl")


@pytest.fixture(scope="session")
def glm4v_model(tmp_path_factory: pytest.TempPathFactory) -> DemoModelPaths:
    return make_demo_model(tmp_path_factory.mktemp("glm4v-models"), family="glm4v")


def start_server(models: DemoModelPaths | Path, log_path: Path, *extra: str,
                 env: dict[str, str] | None = None, family: str = "llava",
                 launcher: tuple[str, ...] = ("-m", "server.cli"),
                 config: Path = ROOT / "configs" / "default.yaml",
                 ready: bool = True) -> RunningServer:
    """`vlserve serve` on a free port, ready; `launcher` runs another entry point instead
    (tests/faulty_server.py). `models` as a Path serves that GGUF alone, named and
    templated by `config` and the file itself. `ready=False` returns once the process
    started, without waiting for /health."""
    port = free_port()
    if isinstance(models, Path):
        model_args = ["--model", str(models)]
    else:
        model_args = ["--model", str(models.text), "--mmproj", str(models.mmproj),
                      "--model-name", MODEL_NAMES[family]]
    cmd = [
        sys.executable, *launcher, "serve", "--config", str(config), *model_args,
        "--port", str(port), "--n-ctx", str(TEST_N_CTX), *extra,
    ]
    # One llama.cpp thread: the demo model is tiny, and with a thread per core its OpenMP
    # barriers collapse when other processes share the cores (2 streams x 3000 tokens took
    # 150 s instead of 3 s on a loaded 2-core box).
    full_env = {**os.environ, "VLSERVE_DEFAULT_MAX_TOKENS": str(TEST_DEFAULT_MAX_TOKENS),
                "VLSERVE_MAX_TOKENS_CAP": str(TEST_MAX_TOKENS_CAP),
                # One llama.cpp thread: the tiny model gains nothing from two, and on a
                # loaded 2-core machine two threads spin in each other's way at every op
                # (2000 tokens: 0.8 s with one thread vs 36-66 s with two, measured here).
                "VLSERVE_N_THREADS": "1",
                # Each server its own batch directory: batches on disk are resumed on start.
                "VLSERVE_BATCH_DIR": str(log_path.parent / "batches"), **(env or {})}
    log = log_path.open("wb")
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path, models, family)
    if not ready:
        return server
    try:
        wait_ready(server)
    except BaseException:
        stop_server(server)  # a server that never got ready must not outlive the test run
        raise
    return server


def wait_ready(server: RunningServer, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log()}")


def stop_server(server: RunningServer) -> None:
    stop_process(server.process)


@pytest.fixture(scope="session")
def llava_server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[RunningServer]:
    """The real server (uvicorn + engine thread) on the LLaVA demo model, with 2 slots."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    running = start_server(demo_model, log_path, "--n-parallel", "2")
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def youtu_server(youtu_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[RunningServer]:
    """The same on the Youtu-VL demo model (deepseek2 + youtuvl), same settings."""
    log_path = tmp_path_factory.mktemp("youtu-server") / "server.log"
    running = start_server(youtu_model, log_path, "--n-parallel", "2", family="youtu-vl")
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def glm4v_server(glm4v_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[RunningServer]:
    """The same on the GLM-4V demo model (glm4 with M-RoPE + glm4v), same settings."""
    log_path = tmp_path_factory.mktemp("glm4v-server") / "server.log"
    running = start_server(glm4v_model, log_path, "--n-parallel", "2", family="glm4v")
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def server(llava_server: RunningServer) -> RunningServer:
    """The default test server: LLaVA (tests that are not about a model family)."""
    return llava_server


@pytest.fixture(scope="module")
def long_server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[RunningServer]:
    """LLaVA with room for a stream of LONG_TOKENS, long enough to still run while the test
    sends other requests (greedy: random weights then never stop early)."""
    running = start_server(demo_model, tmp_path_factory.mktemp("long") / "server.log",
                           "--n-ctx", "4096", env={"VLSERVE_MAX_TOKENS_CAP": str(LONG_TOKENS)})
    yield running
    stop_server(running)


@pytest.fixture(params=FAMILIES)
def family_server(request: pytest.FixtureRequest) -> RunningServer:
    """Each family's server in turn: for the tests every family must pass."""
    return request.getfixturevalue(SERVER_FIXTURES[request.param])


# Random weights spend a token on every character: room for a whole small JSON document.
CONSTRAINED_MAX_TOKENS = 300


@pytest.fixture(scope="module", params=FAMILIES)
def constrained_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[RunningServer]:
    """Each family's server with room for whole JSON answers (structured outputs, tools)."""
    family = request.param
    models = request.getfixturevalue(MODEL_FIXTURES[family])
    log_path = tmp_path_factory.mktemp(f"constrained-{family}") / "server.log"
    running = start_server(models, log_path, "--n-parallel", "2", family=family,
                           env={"VLSERVE_MAX_TOKENS_CAP": str(CONSTRAINED_MAX_TOKENS)})
    yield running
    stop_server(running)
