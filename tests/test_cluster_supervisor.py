"""The shipped supervisord group (supervisor/vlserve-cluster.conf), run for real by
supervisord: two replicas of the demo model behind vllm-router, rendered for a temp dir as
tests/test_supervisor.py does (paths, ports, no `user=`, short startsecs, one thread)."""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from test_cluster import LongStream
from test_supervisor import BIN, SUPERVISOR, read_ini, servers_started_with

from server.cluster.router import DEFAULT_POLICY, HEALTH_ARGS
from server.config import load_settings
from server.demo_model import DemoModelPaths

ROOT = Path(__file__).resolve().parent.parent
CONF = SUPERVISOR / "vlserve-cluster.conf"
REPLICA, ROUTER = "program:vlserve-replica", "program:vllm-router"


def test_shipped_group_config() -> None:
    conf = read_ini(CONF)
    assert conf.get("group:vlserve-cluster", "programs") == "vllm-router,vlserve-replica"
    replica = shlex.split(conf.get(REPLICA, "command"))
    assert replica[1] == "serve" and replica[replica.index("--host") + 1] == "127.0.0.1"
    assert replica[replica.index("--port") + 1] == "787%(process_num)d"
    assert load_settings(ROOT / replica[replica.index("--config") + 1]).model_name
    assert conf.get(REPLICA, "process_name") == "%(program_name)s-%(process_num)d"
    env = environment_of(conf, REPLICA)
    assert env["VLSERVE_REPLICA_ID"] == "r%(process_num)d"
    assert int(conf.get(REPLICA, "stopwaitsecs")) >= float(env["VLSERVE_DRAIN_TIMEOUT"]) + 5
    # The router finishes carrying answers under way: it may take as long as a drain.
    assert int(conf.get(ROUTER, "stopwaitsecs")) >= float(env["VLSERVE_DRAIN_TIMEOUT"]) + 5
    router = conf.get(ROUTER, "command")
    argv = shlex.split(router)
    workers = argv[argv.index("--worker-urls") + 1:argv.index("--policy")]
    n = int(conf.get(REPLICA, "numprocs"))
    assert workers == [f"http://127.0.0.1:787{i}" for i in range(n)]  # one per replica
    assert argv[argv.index("--policy") + 1] == DEFAULT_POLICY
    assert " ".join(HEALTH_ARGS) in router  # the same fast checks as `vlserve cluster`
    assert argv[argv.index("--prometheus-port") + 1] != "29000"


def environment_of(conf: object, section: str) -> dict[str, str]:
    from supervisor.datatypes import dict_of_key_value_pairs

    return dict_of_key_value_pairs(conf.get(section, "environment"))  # type: ignore[attr-defined]


def free_prefix() -> int:
    """A number P whose ports P0 and P1 are both free (replica ports are P%(process_num)d)."""
    for _ in range(200):
        prefix = random.randrange(2000, 6500)
        try:
            for port in (prefix * 10, prefix * 10 + 1, prefix * 10 + 9):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return prefix
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def render(tmp: Path, demo_model: DemoModelPaths) -> tuple[Path, str, Path]:
    """supervisord.conf for tmp including the group; the router URL; the preset."""
    prefix = free_prefix()
    preset = tmp / "preset.yaml"
    preset.write_text(f"model: {demo_model.text}\nmmproj: {demo_model.mmproj}\n"
                      "n_ctx: 4096\nmax_tokens_cap: 2000\ndefault_max_tokens: 8\n")
    conf = read_ini(CONF)
    replica = shlex.split(conf.get(REPLICA, "command"))
    replica[0] = str(BIN / "vlserve")
    replica[replica.index("--config") + 1] = str(preset)
    replica[replica.index("--port") + 1] = f"{prefix}%(process_num)d"
    conf.set(REPLICA, "command", shlex.join(replica))
    router = shlex.split(conf.get(ROUTER, "command"))
    router[0] = str(BIN / "vllm-router")
    router[router.index("--host") + 1] = "127.0.0.1"
    router[router.index("--port") + 1] = str(prefix * 10 + 9)
    at = router.index("--worker-urls") + 1
    router[at:at + 2] = [f"http://127.0.0.1:{prefix}{i}" for i in range(2)]
    router[router.index("--prometheus-port") + 1] = str(free_port())
    conf.set(ROUTER, "command", shlex.join(router))
    for section in (REPLICA, ROUTER):
        conf.set(section, "directory", str(ROOT))
        conf.remove_option(section, "user")
        name = "router" if section == ROUTER else "replica-%(process_num)d"
        conf.set(section, "stdout_logfile", str(tmp / f"{name}.log"))
    conf.set(REPLICA, "startsecs", "1")
    env = environment_of(conf, REPLICA)
    env.update(OMP_NUM_THREADS="1", VLSERVE_N_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(ROOT))
    conf.set(REPLICA, "environment", ",".join(f'{k}="{v}"' for k, v in env.items()))
    group = tmp / "vlserve-cluster.conf"
    with group.open("w") as f:
        conf.write(f)

    main = read_ini(SUPERVISOR / "supervisord.conf")
    sock = tmp / "supervisor.sock"
    main.set("unix_http_server", "file", str(sock))
    main.set("supervisord", "logfile", str(tmp / "supervisord.log"))
    main.set("supervisord", "pidfile", str(tmp / "supervisord.pid"))
    main.set("supervisord", "childlogdir", str(tmp))
    main.set("supervisorctl", "serverurl", f"unix://{sock}")
    main.set("include", "files", str(group))
    path = tmp / "supervisord.conf"
    with path.open("w") as f:
        main.write(f)
    return path, f"http://127.0.0.1:{prefix * 10 + 9}", preset


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Group:
    def __init__(self, conf: Path, url: str, preset: Path, tmp: Path,
                 process: subprocess.Popen[bytes]) -> None:
        self.conf, self.url, self.preset, self.tmp, self.process = conf, url, preset, tmp, process

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "supervisorctl"), "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=90)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.tmp.glob("*.log")))

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            assert self.process.poll() is None, f"supervisord exited:\n{self.logs()}"
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {what}:\n{self.logs()}")


@pytest.fixture
def group(tmp_path: Path, demo_model: DemoModelPaths) -> Iterator[Group]:
    conf, url, preset = render(tmp_path, demo_model)
    with (tmp_path / "supervisord.stdout").open("wb") as out:
        process = subprocess.Popen([str(BIN / "supervisord"), "-n", "-c", str(conf)],
                                   stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    running = Group(conf, url, preset, tmp_path, process)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for pid in servers_started_with(preset):
            os.kill(pid, signal.SIGKILL)


def routed(url: str, session: str) -> str | None:
    try:
        answer = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                            headers={"X-Session-ID": session},
                            json={"messages": [{"role": "user", "content": "Hi"}],
                                  "max_tokens": 2})
    except httpx.TransportError:
        return None
    return answer.headers.get("x-vlserve-replica") if answer.status_code == 200 else None


@pytest.mark.slow
def test_group_routes_to_both_replicas_restarts_one_and_stops_in_order(group: Group) -> None:
    group.wait_for("the router", lambda: routed(group.url, "first") is not None)
    seen = {routed(group.url, f"s{i}") for i in range(24)}
    assert seen == {"r0", "r1"}  # 24 sessions hashed over both replicas

    status = group.ctl("status", "vlserve-cluster:*").stdout
    assert len(re.findall(r"RUNNING", status)) == 3, status
    pid = int(group.ctl("pid", "vlserve-cluster:vlserve-replica-1").stdout.strip())
    os.kill(pid, signal.SIGKILL)
    group.wait_for("replica 1 restarted", lambda: group.ctl(
        "pid", "vlserve-cluster:vlserve-replica-1").stdout.strip() not in ("0", str(pid)))
    group.wait_for("both replicas answering again",
                   lambda: {routed(group.url, f"s{i}") for i in range(24)} == {"r0", "r1"})

    # A stream in flight when the whole group is stopped still finishes.
    stream = LongStream(group.url, "stopping", max_tokens=1500)
    assert stream.started.wait(60) and stream.error is None, stream.error
    stop = group.ctl("stop", "vlserve-cluster:*")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    stream.join(60)
    assert stream.error is None and stream.events[-1] == "[DONE]", stream.events[-3:]
    log = (group.tmp / "supervisord.log").read_text()
    stopped = dict(re.findall(r"stopped: (\S+) \(exit status (\d+)\)", log))
    # SIGTERM → drain → exit 0, for the replicas and the router alike.
    assert stopped == {"vllm-router": "0", "vlserve-replica-0": "0",
                       "vlserve-replica-1": "0"}, log
    assert not servers_started_with(group.preset)
