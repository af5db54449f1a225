"""The shipped supervisord groups (supervisor/vlserve-cluster.conf), run for real by
supervisord: redis-server, two replicas of the demo model sharing it, vllm-router and the
nginx front (supervisor/vlserve-front.nginx.conf, which must equal what `vlserve
cluster-front` writes), rendered for a temp dir as tests/test_supervisor.py does (paths,
ports, no `user=`, short startsecs, one thread). redis-server and nginx are Debian's: a
missing one skips here and fails under CI."""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from configparser import RawConfigParser
from pathlib import Path

import httpx
import openai
import pytest
from ci import skip_unless_ci
from helpers import wait_until
from test_cluster import LongStream
from test_cluster_shared import assert_one_upload_serves_both_replicas
from test_supervisor import (
    BIN,
    SUPERVISOR,
    read_ini,
    servers_started_with,
    write_supervisord_conf,
)

from server.cluster.front import nginx_binary, nginx_conf, write_nginx_conf
from server.cluster.router import DEFAULT_POLICY, HEALTH_ARGS
from server.cluster.state import maxmemory_mb, redis_argv
from server.config import load_settings
from server.demo_model import DemoModelPaths

ROOT = Path(__file__).resolve().parent.parent
CONF = SUPERVISOR / "vlserve-cluster.conf"
FRONT_CONF = SUPERVISOR / "vlserve-front.nginx.conf"
REPLICA, ROUTER = "program:vlserve-replica", "program:vllm-router"
REDIS, FRONT = "program:vlserve-redis", "program:vlserve-front"
PROGRAMS = (REDIS, REPLICA, ROUTER, FRONT)
RUN_DIR = "/opt/vlserve/run"  # the shipped runtime folder, rewritten to the test's


def shell_argv(conf: RawConfigParser, section: str) -> list[str]:
    """The argv a `/bin/sh -c "mkdir -p DIR && exec ARGV"` program runs."""
    sh = shlex.split(conf.get(section, "command"))
    assert sh[:2] == ["/bin/sh", "-c"] and len(sh) == 3, sh
    mkdir, _, run = sh[2].partition(" && exec ")
    assert mkdir.startswith("mkdir -p "), sh
    return shlex.split(run)


def set_shell_argv(conf: RawConfigParser, section: str, mkdir: Path, argv: list[str]) -> None:
    inner = f"mkdir -p {shlex.quote(str(mkdir))} && exec {shlex.join(argv)}"
    conf.set(section, "command", shlex.join(["/bin/sh", "-c", inner]))


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_shipped_group_config() -> None:
    conf = read_ini(CONF)
    assert conf.get("group:vlserve-state", "programs") == "vlserve-redis"
    assert conf.get("group:vlserve-cluster", "programs") == \
        "vlserve-replica,vllm-router,vlserve-front"
    # Redis's group starts first and stops last; in the serving group replicas start
    # before the router, the front last (supervisord stops in the reverse order).
    assert int(conf.get("group:vlserve-state", "priority")) < \
        int(conf.get("group:vlserve-cluster", "priority"))
    assert [int(conf.get(p, "priority")) for p in PROGRAMS] == \
        sorted(int(conf.get(p, "priority")) for p in PROGRAMS)

    replica = shlex.split(conf.get(REPLICA, "command"))
    assert replica[1] == "serve" and flag(replica, "--host") == "127.0.0.1"
    assert flag(replica, "--port") == "787%(process_num)d"
    settings = load_settings(ROOT / flag(replica, "--config"))
    assert settings.model_name
    assert conf.get(REPLICA, "process_name") == "%(program_name)s-%(process_num)d"
    env = environment_of(conf, REPLICA)
    assert env["VLSERVE_REPLICA_ID"] == "r%(process_num)d"
    drain = float(env["VLSERVE_DRAIN_TIMEOUT"])
    for section in (REPLICA, ROUTER, FRONT):  # each may take as long as a drain to stop
        assert int(conf.get(section, "stopwaitsecs")) >= drain + 5, section

    # Redis: the same flags as `vlserve cluster --redis` for the replicas' settings.
    redis = shell_argv(conf, REDIS)
    redis_port = int(flag(redis, "--port"))
    assert redis == redis_argv(redis_port, Path(RUN_DIR), maxmemory_mb(settings),
                               binary="/usr/bin/redis-server")
    assert env["VLSERVE_STATE_URL"] == f"redis://127.0.0.1:{redis_port}/0"

    router = conf.get(ROUTER, "command")
    argv = shlex.split(router)
    workers = argv[argv.index("--worker-urls") + 1:argv.index("--policy")]
    n = int(conf.get(REPLICA, "numprocs"))
    assert workers == [f"http://127.0.0.1:787{i}" for i in range(n)]  # one per replica
    assert flag(argv, "--host") == "127.0.0.1"  # behind the front
    assert flag(argv, "--policy") == DEFAULT_POLICY
    assert " ".join(HEALTH_ARGS) in router  # the same fast checks as `vlserve cluster`
    assert flag(argv, "--prometheus-port") != "29000"

    # The front: the shipped nginx.conf is exactly what the generator writes for these
    # replicas and this router, so the two never drift.
    nginx = shell_argv(conf, FRONT)
    assert flag(nginx, "-c") == f"/opt/vlserve/{FRONT_CONF.relative_to(ROOT)}"
    assert conf.get(FRONT, "stopsignal") == "QUIT"  # nginx's graceful stop
    router_url = f"http://127.0.0.1:{flag(argv, '--port')}"
    assert FRONT_CONF.read_text() == nginx_conf("0.0.0.0:7860", router_url, workers,
                                                Path(flag(nginx, "-p")))


def test_cluster_front_command_writes_the_shipped_file(tmp_path: Path) -> None:
    out = tmp_path / "front.conf"
    done = subprocess.run(
        [str(BIN / "vlserve"), "cluster-front", "--replicas", "http://127.0.0.1:7870",
         "http://127.0.0.1:7871", "--router", "http://127.0.0.1:7868", "--listen",
         "0.0.0.0:7860", "--workdir", f"{RUN_DIR}/front", "-o", str(out)],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == FRONT_CONF.read_text()
    bad = subprocess.run([str(BIN / "vlserve"), "cluster-front", "--replicas", "7870",
                          "--router", "http://127.0.0.1:7868", "--listen", "0.0.0.0:7860",
                          "-o", str(tmp_path / "bad.conf")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected http://host:port, got '7870'" in bad.stderr
    assert not (tmp_path / "bad.conf").exists()


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


class Ports:
    """The rendered group's ports: replicas P0 and P1, the router P9, the front and Redis."""

    def __init__(self) -> None:
        self.prefix = free_prefix()
        self.router = self.prefix * 10 + 9
        self.front = free_port()
        self.redis = free_port()
        self.prometheus = free_port()

    def replicas(self) -> list[str]:
        return [f"http://127.0.0.1:{self.prefix}{i}" for i in range(2)]


def render(tmp: Path, demo_model: DemoModelPaths) -> tuple[Path, Ports, Path]:
    """supervisord.conf for tmp including the groups; their ports; the preset."""
    redis_bin, nginx_bin = shutil.which("redis-server"), nginx_binary()
    if redis_bin is None or nginx_bin is None:
        skip_unless_ci("the supervisord group needs redis-server and nginx (Debian packages)")
    assert redis_bin is not None and nginx_bin is not None
    ports = Ports()
    run = tmp / "run"
    preset = tmp / "preset.yaml"
    preset.write_text(f"model: {demo_model.text}\nmmproj: {demo_model.mmproj}\n"
                      "n_ctx: 4096\nmax_tokens_cap: 2000\ndefault_max_tokens: 8\n")
    conf = read_ini(CONF)
    redis = shell_argv(conf, REDIS)
    redis[0] = redis_bin
    shipped_redis = f"127.0.0.1:{flag(redis, '--port')}"
    redis[redis.index("--port") + 1] = str(ports.redis)
    redis[redis.index("--dir") + 1] = str(run)
    set_shell_argv(conf, REDIS, run, redis)

    replica = shlex.split(conf.get(REPLICA, "command"))
    replica[0] = str(BIN / "vlserve")
    replica[replica.index("--config") + 1] = str(preset)
    replica[replica.index("--port") + 1] = f"{ports.prefix}%(process_num)d"
    conf.set(REPLICA, "command", shlex.join(replica))
    router = shlex.split(conf.get(ROUTER, "command"))
    router[0] = str(BIN / "vllm-router")
    router[router.index("--port") + 1] = str(ports.router)
    at = router.index("--worker-urls") + 1
    router[at:at + 2] = ports.replicas()
    router[router.index("--prometheus-port") + 1] = str(ports.prometheus)
    conf.set(ROUTER, "command", shlex.join(router))

    # The front: the shipped file's settings for this run's ports and folders.
    front_conf = write_nginx_conf(f"127.0.0.1:{ports.front}", f"http://127.0.0.1:"
                                  f"{ports.router}", ports.replicas(), tmp / "front.conf",
                                  run / "front")
    nginx = shell_argv(conf, FRONT)
    nginx[0] = nginx_bin
    nginx[nginx.index("-c") + 1] = str(front_conf)
    nginx[nginx.index("-p") + 1] = str(run / "front")
    set_shell_argv(conf, FRONT, run / "front", nginx)

    for section in PROGRAMS:
        conf.set(section, "directory", str(ROOT))
        conf.remove_option(section, "user")
        name = section.removeprefix("program:").replace("vlserve-replica",
                                                        "replica-%(process_num)d")
        conf.set(section, "stdout_logfile", str(tmp / f"{name}.log"))
    conf.set(REPLICA, "startsecs", "1")
    env = environment_of(conf, REPLICA)
    env.update(OMP_NUM_THREADS="1", VLSERVE_N_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(ROOT), VLSERVE_STATE_URL=env["VLSERVE_STATE_URL"].replace(
                   shipped_redis, f"127.0.0.1:{ports.redis}"))
    conf.set(REPLICA, "environment", ",".join(f'{k}="{v}"' for k, v in env.items()))
    group = tmp / "vlserve-cluster.conf"
    with group.open("w") as f:
        conf.write(f)

    return write_supervisord_conf(tmp, group), ports, preset


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Group:
    def __init__(self, conf: Path, ports: Ports, preset: Path, tmp: Path,
                 process: subprocess.Popen[bytes]) -> None:
        self.conf, self.ports, self.preset, self.tmp = conf, ports, preset, tmp
        self.process = process
        self.url = f"http://127.0.0.1:{ports.front}"  # the one address: the front

    def pid(self, name: str) -> int:
        return int(self.ctl("pid", name).stdout.strip())

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "supervisorctl"), "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=90)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.tmp.glob("*.log")))

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 90) -> None:
        wait_until(what, check, self.process, self.logs, "supervisord", timeout, poll=0.2)


@pytest.fixture
def group(tmp_path: Path, demo_model: DemoModelPaths) -> Iterator[Group]:
    conf, ports, preset = render(tmp_path, demo_model)
    with (tmp_path / "supervisord.stdout").open("wb") as out:
        process = subprocess.Popen([str(BIN / "supervisord"), "-n", "-c", str(conf)],
                                   stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    running = Group(conf, ports, preset, tmp_path, process)
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
        for pid in [*servers_started_with(preset), *processes_naming(tmp_path)]:
            os.kill(pid, signal.SIGKILL)


def processes_naming(folder: Path) -> list[int]:
    """Live processes whose command line names `folder` (Redis's --dir, nginx's -c)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(folder).encode() in cmdline.read_bytes() and int(cmdline.parent.name) != \
                    os.getpid() and not zombie(int(cmdline.parent.name)):
                pids.append(int(cmdline.parent.name))
        except (OSError, ValueError):
            continue
    return pids


def zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def alive(pid: int) -> bool:
    try:
        return not zombie(pid)
    except OSError:
        return False


def children_of(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


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
def test_group_serves_uploads_through_the_front_restarts_one_and_stops_in_order(
        group: Group) -> None:
    group.wait_for("the front", lambda: routed(group.url, "first") is not None)
    seen = {routed(group.url, f"s{i}") for i in range(24)}
    assert seen == {"r0", "r1"}  # 24 sessions hashed over both replicas

    status = group.ctl("status", "vlserve-cluster:*", "vlserve-state:*").stdout
    assert len(re.findall(r"RUNNING", status)) == 5, status

    file_id = assert_one_upload_serves_both_replicas(group.url, seed=5)

    pid = group.pid("vlserve-cluster:vlserve-replica-1")
    os.kill(pid, signal.SIGKILL)
    group.wait_for("replica 1 restarted", lambda: group.ctl(
        "pid", "vlserve-cluster:vlserve-replica-1").stdout.strip() not in ("0", str(pid)))
    group.wait_for("both replicas answering again",
                   lambda: {routed(group.url, f"s{i}") for i in range(24)} == {"r0", "r1"})
    # The upload outlived the replica that took it: it is in Redis.
    client = openai.OpenAI(base_url=f"{group.url}/v1", api_key="unused", max_retries=0)
    assert client.files.retrieve(file_id).id == file_id

    names = ["vlserve-state:vlserve-redis", "vlserve-cluster:vllm-router",
             "vlserve-cluster:vlserve-front", "vlserve-cluster:vlserve-replica-0",
             "vlserve-cluster:vlserve-replica-1"]
    pids = [group.pid(name) for name in names]
    pids += children_of(group.pid("vlserve-cluster:vlserve-front"))  # nginx's worker
    assert len(pids) == 6 and all(pids), pids

    # A stream in flight through the front when both groups are stopped still finishes.
    stream = LongStream(group.url, "stopping", max_tokens=1500)
    assert stream.started.wait(60) and stream.error is None, stream.error
    stop = group.ctl("stop", "vlserve-cluster:*", "vlserve-state:*")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    stream.join(60)
    assert stream.error is None and stream.events[-1] == "[DONE]", stream.events[-3:]
    log = (group.tmp / "supervisord.log").read_text()
    stopped = re.findall(r"stopped: (\S+) \(exit status (\d+)\)", log)
    # SIGTERM (nginx: SIGQUIT) → drain → exit 0, every program; Redis after all the rest.
    assert dict(stopped) == {"vllm-router": "0", "vlserve-replica-0": "0",
                             "vlserve-replica-1": "0", "vlserve-front": "0",
                             "vlserve-redis": "0"}, log
    assert stopped[-1][0] == "vlserve-redis", stopped
    assert not [pid for pid in pids if alive(pid)], log
    assert not servers_started_with(group.preset)
    assert processes_naming(group.tmp) == [group.process.pid]  # supervisord alone

    # supervisord's own shutdown (systemd stopping it) goes by the groups' priorities:
    # the serving group stops whole before Redis is signalled.
    start = group.ctl("start", "vlserve-state:*", "vlserve-cluster:*")
    assert start.returncode == 0, start.stdout + start.stderr
    group.wait_for("the front again", lambda: routed(group.url, "again") is not None)
    mark = len(log)
    group.process.send_signal(signal.SIGTERM)
    assert group.process.wait(timeout=90) == 0
    log = (group.tmp / "supervisord.log").read_text()[mark:]
    stopped = re.findall(r"stopped: (\S+) \(exit status (\d+)\)", log)
    assert len(stopped) == 5 and stopped[-1] == ("vlserve-redis", "0"), log
    assert processes_naming(group.tmp) == [], log
