"""A throwaway redis-server on loopback (Debian's package), for the shared-state tests.

Missing on a developer's machine: the tests skip. Under CI (.ci/run installs it) they fail.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ci import skip_unless_ci
from conftest import RunningServer, start_server, stop_server

from bench.servers import free_port, stop_process
from server.demo_model import DemoModelPaths


@dataclass
class RedisServer:
    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        """Start (or start again, same port, empty): nothing is saved to disk."""
        binary = shutil.which("redis-server")
        if binary is None:
            skip_unless_ci("redis-server is not installed (Debian: apt-get install redis-server)")
        assert binary is not None
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir),
             "--enable-debug-command", "local"],  # DEBUG SLEEP: a Redis that hangs
            stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the process holds its own
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.workdir / "redis.log").read_text()
            if self.command("PING") == "+PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING in 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_process(self.process)  # type: ignore[arg-type]

    def command(self, *words: str, timeout: float = 5) -> str | None:
        """One inline command's first reply line (e.g. ":3" or "+PONG"); None when down."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.sendall((" ".join(words) + "\r\n").encode())
                return sock.makefile("rb").readline().decode().strip()
        except OSError:
            return None


def start_redis(workdir: Path) -> RedisServer:
    server = RedisServer(free_port(), workdir)
    server.start()
    return server


@contextmanager
def server_on_store(store: str, models: DemoModelPaths, logs: Path, *extra: str,
                    env: dict[str, str]) -> Iterator[tuple[RunningServer, RedisServer | None]]:
    """A vlserve whose state lives in `store`: "memory", or "redis" (a redis-server of its
    own, in `logs`); both stopped after."""
    redis: RedisServer | None = None
    if store == "redis":
        redis = start_redis(logs)
        env = {**env, "VLSERVE_STATE_URL": redis.url(0)}
    try:
        running = start_server(models, logs / "server.log", *extra, env=env)
        yield running, redis
        stop_server(running)
    finally:
        if redis is not None:
            redis.stop()
