"""The shipped supervisord program, run for real by supervisord on the demo model.

The configs under supervisor/ are rendered for a temp dir: paths (socket, pidfile, logs,
preset, checkout) are replaced, `user=` is dropped (the test cannot switch users) and
startsecs is shortened (the demo model loads in well under a second; the shipped 30 s is
for a 5 GB model). Everything else (command line, autorestart, stop signal and wait,
environment, log rotation) is used as shipped.
"""

from __future__ import annotations

import configparser
import contextlib
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from helpers import Stream, wait_until
from supervisor.datatypes import dict_of_key_value_pairs

from server.config import load_settings
from server.demo_model import DemoModelPaths

ROOT = Path(__file__).resolve().parent.parent
SUPERVISOR = ROOT / "supervisor"
NAME = "youtu-vl-4b-instruct-gguf"
SECTION = f"program:{NAME}"
BIN = Path(sys.executable).parent  # supervisord, supervisorctl and vlserve live here


def read_ini(path: Path) -> configparser.RawConfigParser:
    # supervisord's own syntax: ';' starts a comment after whitespace, no interpolation.
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read(path)
    return parser


def environment(program: configparser.RawConfigParser) -> dict[str, str]:
    return dict_of_key_value_pairs(program.get(SECTION, "environment"))


def test_shipped_program_config() -> None:
    program = read_ini(SUPERVISOR / f"{NAME}.conf")
    get = functools.partial(program.get, SECTION)
    argv = shlex.split(get("command"))
    assert Path(argv[0]).name == "vlserve" and argv[1] == "serve"
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    preset = ROOT / argv[argv.index("--config") + 1]
    settings = load_settings(preset)
    assert settings.model_name == "Youtu-VL-4B-Instruct-GGUF"
    assert (get("autostart"), get("autorestart"), get("stopsignal")) == ("true", "true", "TERM")
    env = environment(program)
    assert {"CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "VLSERVE_N_THREADS"} <= set(env)
    assert env["MALLOC_ARENA_MAX"] == "2"  # flat RSS under load (tests/test_soak.py)
    # Stored responses and conversations kept across restarts, beside the batches.
    assert env["VLSERVE_STATE_SNAPSHOT"] == f"{get('directory')}/data/state.json"
    drain = float(env.get("VLSERVE_DRAIN_TIMEOUT", settings.drain_timeout))
    # supervisord must not SIGKILL before the drain is over (plus engine shutdown).
    assert int(get("stopwaitsecs")) >= drain + 5
    assert int(get("startsecs")) >= 10  # covers loading a multi-GB model
    assert get("stdout_logfile") == f"/var/log/supervisor/{NAME}-stdout.log"
    assert get("redirect_stderr") == "true"  # the server logs to stderr
    assert get("stdout_logfile_maxbytes") and int(get("stdout_logfile_backups")) > 0
    main = read_ini(SUPERVISOR / "supervisord.conf")
    assert main.get("include", "files") == f"{NAME}.conf"


@dataclass
class Supervisord:
    conf: Path
    log: Path
    program_log: Path
    preset: Path  # unique to this test: finds its server processes in /proc
    url: str
    process: subprocess.Popen[bytes]

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "supervisorctl"), "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=60)

    def pid(self) -> int:
        out = self.ctl("pid", NAME).stdout.strip()
        return int(out) if out.isdigit() else 0

    def logs(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        if self.program_log.exists():
            text += "\n--- program log ---\n" + self.program_log.read_text(errors="replace")
        return text


def render(tmp: Path, demo_model: DemoModelPaths, port: int, n_ctx: int = 1024) -> Path:
    preset = tmp / "preset.yaml"
    preset.write_text(f"model: {demo_model.text}\nmmproj: {demo_model.mmproj}\n"
                      f"model_name: Youtu-VL-4B-Instruct-GGUF\nport: {port}\n"
                      f"n_ctx: {n_ctx}\nmax_tokens_cap: {n_ctx}\n")

    program = read_ini(SUPERVISOR / f"{NAME}.conf")
    argv = shlex.split(program.get(SECTION, "command"))
    argv[0] = str(BIN / "vlserve")
    argv[argv.index("--config") + 1] = str(preset)
    program.set(SECTION, "command", shlex.join(argv))
    program.set(SECTION, "directory", str(ROOT))
    program.remove_option(SECTION, "user")
    program.set(SECTION, "startsecs", "1")
    program.set(SECTION, "stdout_logfile", str(tmp / f"{NAME}-stdout.log"))
    env = environment(program)
    threads = str(os.cpu_count() or 1)  # the shipped 8 would oversubscribe a small CI box
    env.update(OMP_NUM_THREADS=threads, VLSERVE_N_THREADS=threads,
               PYTHONPATH=str(ROOT))  # the console script imports this checkout
    env["VLSERVE_STATE_SNAPSHOT"] = str(snapshot_path(tmp))  # the shipped one, moved here
    program.set(SECTION, "environment", ",".join(f'{k}="{v}"' for k, v in env.items()))
    program_conf = tmp / f"{NAME}.conf"
    with program_conf.open("w") as f:
        program.write(f)

    return write_supervisord_conf(tmp, program_conf)


def snapshot_path(tmp: Path) -> Path:
    return tmp / "data" / "state.json"


def write_supervisord_conf(tmp: Path, include: Path) -> Path:
    """The shipped supervisord.conf with its socket, log, pid file and children's logs
    under `tmp`, including `include` (the programs under test)."""
    main = read_ini(SUPERVISOR / "supervisord.conf")
    sock = tmp / "supervisor.sock"
    main.set("unix_http_server", "file", str(sock))
    main.set("supervisord", "logfile", str(tmp / "supervisord.log"))
    main.set("supervisord", "pidfile", str(tmp / "supervisord.pid"))
    main.set("supervisord", "childlogdir", str(tmp))
    main.set("supervisorctl", "serverurl", f"unix://{sock}")
    main.set("include", "files", str(include))
    conf = tmp / "supervisord.conf"
    with conf.open("w") as f:
        main.write(f)
    return conf


def alive_vlserve(pid: int) -> bool:
    """True for a live, non-zombie vlserve process (pids can be reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"vlserve" in cmdline


def servers_started_with(preset: Path) -> list[int]:
    """Live processes whose command line names this test's preset: ours and only ours."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(preset).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return [pid for pid in pids if alive_vlserve(pid)]


def wait_for(what: str, check: Callable[[], bool], sup: Supervisord, timeout: float = 90.0
             ) -> None:
    wait_until(what, check, sup.process, sup.logs, "supervisord", timeout)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def supervisord(tmp_path: Path, demo_model: DemoModelPaths) -> Iterator[Supervisord]:
    with running_supervisord(tmp_path, demo_model) as sup:
        yield sup


@contextlib.contextmanager
def running_supervisord(tmp_path: Path, demo_model: DemoModelPaths, n_ctx: int = 1024
                        ) -> Iterator[Supervisord]:
    port = free_port()
    conf = render(tmp_path, demo_model, port, n_ctx)
    log = tmp_path / "supervisord.stdout"
    with log.open("wb") as out:
        process = subprocess.Popen([str(BIN / "supervisord"), "-n", "-c", str(conf)],
                                   stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    sup = Supervisord(conf, tmp_path / "supervisord.log", tmp_path / f"{NAME}-stdout.log",
                      tmp_path / "preset.yaml", f"http://127.0.0.1:{port}", process)
    try:
        yield sup
    finally:
        # Whatever happened, leave no supervisord and no server behind. supervisord puts
        # its children in their own process groups, so they are found by command line.
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # stops the program, then exits
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for pid in servers_started_with(sup.preset):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_supervisord_restarts_a_killed_server_and_stops_it_cleanly(
        supervisord: Supervisord) -> None:
    sup = supervisord
    wait_for("/health", lambda: healthy(sup.url), sup)
    wait_for("RUNNING", lambda: "RUNNING" in sup.ctl("status", NAME).stdout, sup)
    first = sup.pid()
    assert first and alive_vlserve(first)
    # Written at the start (what it restored: nothing), so a kill keeps at least that.
    wait_for("the first snapshot", snapshot_path(sup.conf.parent).exists, sup)
    assert json.loads(snapshot_path(sup.conf.parent).read_text())["tables"] == {
        "responses": [], "conversations": [], "chat_completions": []}

    os.kill(first, signal.SIGKILL)
    wait_for("a new server process", lambda: sup.pid() not in (0, first), sup)
    second = sup.pid()
    wait_for("/health after the restart", lambda: healthy(sup.url), sup)
    assert not alive_vlserve(first) and alive_vlserve(second)
    log = sup.log.read_text()
    assert f"exited: {NAME} (terminated by SIGKILL; not expected)" in log
    conversation = httpx.post(f"{sup.url}/v1/conversations", json={}, timeout=30).json()

    stop = sup.ctl("stop", NAME)
    assert stop.returncode == 0 and f"{NAME}: stopped" in stop.stdout, stop.stdout
    assert not alive_vlserve(second) and not servers_started_with(sup.preset)
    assert not healthy(sup.url)
    # SIGTERM → drain → exit 0, so supervisord saw a clean exit, not a kill.
    assert re.search(rf"stopped: {re.escape(NAME)} \(exit status 0\)", sup.log.read_text()), \
        sup.logs()
    assert "signal 15: draining" in sup.program_log.read_text()
    assert "STOPPED" in sup.ctl("status", NAME).stdout
    # The shipped program keeps conversations across restarts: written at the stop.
    kept = json.loads(snapshot_path(sup.conf.parent).read_text())["tables"]["conversations"]
    assert [row[1] for row in kept] == [conversation["id"]]

    shutdown = sup.ctl("shutdown")
    assert shutdown.returncode == 0, shutdown.stdout + shutdown.stderr
    assert sup.process.wait(timeout=30) == 0


@pytest.mark.slow
def test_kill_9_with_streams_in_flight(tmp_path: Path, demo_model: DemoModelPaths) -> None:
    """Streams cut by a SIGKILL end at once with a connection error (not at their read
    timeout), supervisord brings the server back, and the next request succeeds."""
    long = 30_000  # tokens: far more than the streams get to before the kill
    with running_supervisord(tmp_path, demo_model, n_ctx=long + 1000) as sup:
        wait_for("/health", lambda: healthy(sup.url), sup)
        wait_for("RUNNING", lambda: "RUNNING" in sup.ctl("status", NAME).stdout, sup)
        first = sup.pid()
        body = {"messages": [{"role": "user", "content": "Go on forever."}],
                "temperature": 0, "max_tokens": long}
        streams = [Stream(f"{sup.url}/v1", body) for _ in range(3)]
        for stream in streams:
            assert stream.started.wait(60) and stream.status == 200, stream.error

        os.kill(first, signal.SIGKILL)
        for stream in streams:
            stream.join(60)  # well inside their 120 s read timeout
            assert isinstance(stream.error, httpx.TransportError), stream.error
            assert not isinstance(stream.error, httpx.TimeoutException), stream.error
            assert "[DONE]" not in stream.events  # cut short, and told so

        wait_for("a new server process", lambda: sup.pid() not in (0, first), sup)
        wait_for("/health after the restart", lambda: healthy(sup.url), sup)
        answer = httpx.post(f"{sup.url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Back?"}], "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] is not None
