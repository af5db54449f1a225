"""bench.servers.wait_quiet: a side-by-side benchmark starts measuring only once neither
server works in the background (vlserve's next-turn prefill would otherwise land on the
other server's clock)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.servers import Server, stop_process, wait_quiet

BUSY_THEN_IDLE = ("import time\nend = time.monotonic() + {busy}\n"
                  "while time.monotonic() < end: pass\ntime.sleep(60)\n")


def run(busy_s: float, tmp_path: Path) -> Server:
    process = subprocess.Popen([sys.executable, "-c", BUSY_THEN_IDLE.format(busy=busy_s)])
    return Server("busy", "http://127.0.0.1:1/v1", process, tmp_path / "log")


def test_waits_while_a_server_burns_cpu_and_not_after(tmp_path: Path) -> None:
    busy = run(1.0, tmp_path)
    idle = run(0.0, tmp_path)
    try:
        time.sleep(0.3)  # both started; `idle` is asleep, `busy` spins for 0.7 s more
        started = time.monotonic()
        wait_quiet([idle, busy])
        assert time.monotonic() - started >= 0.4
        assert busy.cpu_seconds() >= 0.5
        started = time.monotonic()
        wait_quiet([idle, busy])
        assert time.monotonic() - started < 0.5
    finally:
        stop_process(busy.process)
        stop_process(idle.process)
