"""One supervised child process (a replica or the router): start, restart, stop, logs."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

logger = logging.getLogger("vlserve.cluster")

_PR_SET_PDEATHSIG = 1
TAIL_BYTES = 64 * 1024  # what log_tail reads from the end of a child's log
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the cluster process dies, even by SIGKILL,
    so no replica is left holding a model nobody routes to. Children run in their own
    session (a terminal's Ctrl-C reaches only the cluster, which stops them in order)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str],
                 log_dir: Path | None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.not_before = 0.0  # monotonic time before which it is not restarted

    def start(self) -> None:
        """Start (or restart) the process; call from the main thread only (PDEATHSIG
        follows the thread that forked)."""
        out: IO[bytes] | int = subprocess.PIPE
        if self.log_dir is not None:
            out = (self.log_dir / f"{self.name}.log").open("ab")
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        if out is subprocess.PIPE:
            assert self.process.stdout is not None
            threading.Thread(target=_prefix_lines, args=(self.name, self.process.stdout),
                             daemon=True).start()
        else:
            out.close()  # type: ignore[union-attr]
        self.started_at = time.monotonic()

    def log_tail(self, lines: int = 5) -> str:
        """Its log's last lines, for an error message (none when it logs to our stderr)."""
        if self.log_dir is None:
            return ""
        path = self.log_dir / f"{self.name}.log"
        try:
            with path.open("rb") as log:  # its end only: a year of log is gigabytes
                log.seek(max(0, log.seek(0, os.SEEK_END) - TAIL_BYTES))
                end = log.read()
        except FileNotFoundError:
            return ""
        tail = end.decode(errors="replace").splitlines()[-lines:]
        return "".join(f"\n  {line}" for line in tail)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def exited(self) -> int | None:
        """Its exit status once it has exited (negative: the signal), else None."""
        return None if self.process is None else self.process.poll()

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def wait(self, timeout: float) -> bool:
        """Whether it exited within `timeout`; past it, it is killed."""
        if self.process is None:
            return True
        try:
            self.process.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            logger.warning("%s did not exit within %.0f s: killing it", self.name, timeout)
            self.process.kill()
            self.process.wait()
            return False


def _prefix_lines(name: str, stream: IO[bytes]) -> None:
    """Copy a child's output to ours, each line tagged with whose it is."""
    tag = f"[{name}] ".encode()
    out = sys.stderr.buffer
    for line in iter(stream.readline, b""):
        with contextlib.suppress(ValueError, OSError):  # our stderr closed at exit
            out.write(tag + line)
            out.flush()
    stream.close()


def child_env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
