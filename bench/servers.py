"""Start and stop the servers a benchmark compares, on loopback, with their logs in files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class Server:
    name: str
    url: str  # http://127.0.0.1:PORT/v1
    process: subprocess.Popen[bytes]
    log: Path
    ready_after_s: float = 0.0

    def stop(self) -> None:
        stop_process(self.process)

    def cpu_seconds(self) -> float:
        """CPU time the server's process has used so far (Linux /proc; 0 elsewhere)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_quiet(servers: list[Server], window_s: float = 0.1, busy_below: float = 0.1,
               limit_s: float = 10.0) -> None:
    """Wait until none of `servers` works in the background (under `busy_below` of a core
    over `window_s`): work a server does after answering (e.g. vlserve evaluating a next
    turn ahead) must not land in the other server's measurement on shared cores."""
    deadline = time.monotonic() + limit_s
    before = [s.cpu_seconds() for s in servers]
    while time.monotonic() < deadline:
        time.sleep(window_s)
        after = [s.cpu_seconds() for s in servers]
        if all(b - a < busy_below * window_s for a, b in zip(before, after, strict=True)):
            return
        before = after


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server drains and exits), then SIGKILL after 20 s."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(name: str, args: list[str], ready_path: str, log_dir: Path, port: int, *,
          python: bool = True, cwd: Path | None = None) -> Server:
    """Run `args` (a Python module's, unless `python` is False) until `ready_path` answers."""
    log = log_dir / f"{name.replace('/', '_')}.log"
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, *args] if python else args, cwd=cwd,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    server = Server(name, f"http://127.0.0.1:{port}/v1", process, log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                server.ready_after_s = time.perf_counter() - started
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"{name} did not become ready")


def start_vlserve(model: Path, mmproj: Path | None, log_dir: Path, *, threads: int,
                  n_parallel: int, config: Path | None = None, n_ctx: int = 4096,
                  name: str = "vlserve", source: Path | None = None,
                  prompt_lookup: bool = False) -> Server:
    """vlserve on loopback; `source`: a checkout whose `server` package runs instead of this
    one (`python -m` puts the working directory first on the import path); `prompt_lookup`:
    drafts from the request's own text (unset otherwise: a version before the setting
    refuses a variable it does not know)."""
    port = free_port()
    args = ["-m", "server.cli", "serve", "--model", str(model), "--port", str(port),
            "--n-ctx", str(n_ctx), "--n-parallel", str(n_parallel), "--log-level", "warning"]
    if mmproj is not None:
        args += ["--mmproj", str(mmproj)]
    if config is not None:
        args += ["--config", str(config)]
    os.environ["VLSERVE_N_THREADS"] = str(threads)
    os.environ["VLSERVE_MAX_TOKENS_CAP"] = "4096"
    if prompt_lookup:
        os.environ["VLSERVE_PROMPT_LOOKUP"] = "true"
    else:
        os.environ.pop("VLSERVE_PROMPT_LOOKUP", None)
    return start(name, args, "/health", log_dir, port, cwd=source)


def start_llama_cpp_server(model: Path, mmproj: Path, log_dir: Path, *, threads: int) -> Server:
    """llama-cpp-python's own OpenAI server (its `server` extra) on the same files."""
    port = free_port()
    args = ["-m", "llama_cpp.server", "--model", str(model), "--clip_model_path", str(mmproj),
            "--chat_format", "llava-1-5", "--interrupt_requests", "False", "--n_ctx", "4096",
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--port", str(port),
            "--host", "127.0.0.1", "--verbose", "False"]
    return start("llama_cpp.server", args, "/v1/models", log_dir, port)
