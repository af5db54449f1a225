"""A local cluster: N replicas on free loopback ports behind vllm-router on one port."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from server.cluster.child import Child, child_env
from server.cluster.failover import RouterWorkers
from server.cluster.front import nginx_argv, write_nginx_conf
from server.cluster.router import DEFAULT_POLICY, router_argv
from server.cluster.state import redis_argv
from server.cpus import usable_cores

logger = logging.getLogger("vlserve.cluster")

REPLICA_HOST = "127.0.0.1"  # replicas are reached through the router only
# A replica that dies sooner than this after its start is restarted after a growing pause
# (1, 2, 4 ... 30 s), so a model that cannot load does not spin the CPU.
STABLE_AFTER_S = 15.0
# How often the children are polled: a dead replica leaves the router's list within this.
POLL_S = 0.1


@dataclass
class ClusterSpec:
    model: Path | None = None
    mmproj: Path | None = None
    config: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    replicas: int = 2
    policy: str = DEFAULT_POLICY
    threads_per_replica: int = 0  # 0: the cores shared out evenly (at least one each)
    # VLSERVE_* (or any) variables for every replica: the seam for shared settings such as
    # VLSERVE_STATE_URL (a store all replicas use) or VLSERVE_N_PARALLEL.
    replica_env: dict[str, str] = field(default_factory=dict)
    # GPU ids handed out in turn (replica i gets gpus[i % len]) as CUDA_VISIBLE_DEVICES;
    # empty: every replica sees what this process sees (llama.cpp would split each
    # replica's layers over all of them).
    gpus: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()  # passed to vllm-router as they are
    log_dir: Path | None = None  # None: children's lines on our stderr, tagged
    # A store every replica shares (uploads, stored responses); with one, nginx takes the
    # cluster's port (the router cannot carry multipart uploads) and the router moves behind
    # it. `local_redis`: a redis-server of the cluster's own, on loopback.
    state_url: str | None = None
    local_redis: bool = False
    redis_maxmemory_mb: int = 1024  # state.maxmemory_mb of the replicas' settings
    # The replicas' batch_dir: without a shared store each replica keeps and runs its own
    # batches, so each gets a folder of its own under it (one folder would have every
    # replica run every batch).
    batch_dir: Path = Path("data/batches")
    # The replicas' state_snapshot (from the preset, the environment or --replica-env):
    # without a shared store each replica writes its own file beside it.
    state_snapshot: Path | None = None
    ready_timeout: float = 600.0
    drain_timeout: float = 30.0  # what each replica gets after SIGTERM (its drain_timeout)

    def threads(self) -> int:
        return self.threads_per_replica or max(1, usable_cores().usable // self.replicas)


class ClusterError(RuntimeError):
    """The cluster could not start (a child exited or did not get ready)."""


class Cluster:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.workdir = spec.log_dir or Path(tempfile.mkdtemp(prefix="vlserve-cluster-"))
        self.redis: Child | None = None
        self.state_url = spec.state_url
        if spec.local_redis:
            redis_port = free_port()
            self.redis = Child("redis", redis_argv(redis_port, self.workdir,
                                                   spec.redis_maxmemory_mb),
                               child_env({}), spec.log_dir)
            self.state_url = f"redis://{REPLICA_HOST}:{redis_port}/0"
        self.ports = [free_port() for _ in range(spec.replicas)]
        self.replicas = [self._replica(i, port) for i, port in enumerate(self.ports)]
        # With shared state the front takes the cluster's port, the router a loopback one.
        fronted = self.state_url is not None
        router_host, router_port = (REPLICA_HOST, free_port()) if fronted else (spec.host,
                                                                                 spec.port)
        self.router_url = f"http://{REPLICA_HOST}:{router_port}"
        self.router = Child("router", router_argv(
            host=router_host, port=router_port, workers=self.replica_urls(),
            policy=spec.policy, prometheus_port=free_port(),
            startup_timeout=spec.ready_timeout, extra=spec.router_args), child_env({}),
            spec.log_dir)
        self.front: Child | None = None
        if fronted:
            listen = f"[{spec.host}]:{spec.port}" if ":" in spec.host else \
                f"{spec.host}:{spec.port}"
            conf = write_nginx_conf(listen, self.router_url, self.replica_urls(),
                                    self.workdir / "front" / "nginx.conf")
            self.front = Child("front", nginx_argv(conf), child_env({}), spec.log_dir)
        # The router's admin calls go to the router itself, never through the front (which
        # refuses them: they are not for clients).
        self.admin_url = self.router_url if fronted else self.url
        self.workers = RouterWorkers(self.admin_url)
        self.stopping = threading.Event()

    @property
    def url(self) -> str:
        """The cluster's one address (the front's, else the router's)."""
        host = REPLICA_HOST if self.spec.host in ("0.0.0.0", "::") else self.spec.host
        return f"http://{host}:{self.spec.port}"

    def children(self) -> list[Child]:
        """Everything supervised, in start order."""
        return [c for c in (self.redis, *self.replicas, self.router, self.front)
                if c is not None]

    def replica_urls(self) -> list[str]:
        return [f"http://{REPLICA_HOST}:{port}" for port in self.ports]

    def _replica(self, index: int, port: int) -> Child:
        spec = self.spec
        argv = [sys.executable, "-m", "server.cli", "serve", "--host", REPLICA_HOST,
                "--port", str(port)]
        for flag, value in (("--config", spec.config), ("--model", spec.model),
                            ("--mmproj", spec.mmproj)):
            if value is not None:
                argv += [flag, str(value)]
        threads = str(spec.threads())
        gpu = {"CUDA_VISIBLE_DEVICES": spec.gpus[index % len(spec.gpus)]} if spec.gpus else {}
        state = {"VLSERVE_STATE_URL": self.state_url} if self.state_url else {}
        own = {} if self.state_url else {"VLSERVE_BATCH_DIR": str(spec.batch_dir / f"r{index}"),
                                         **replica_snapshot(spec.state_snapshot, index)}
        env = child_env({"VLSERVE_N_THREADS": threads, "OMP_NUM_THREADS": threads,
                         "VLSERVE_REPLICA_ID": f"r{index}",
                         "VLSERVE_DRAIN_TIMEOUT": str(spec.drain_timeout),
                         **gpu, **state, **spec.replica_env, **own})
        return Child(f"r{index}", argv, env, spec.log_dir)

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start every replica and the router; return once all are ready."""
        if self.spec.log_dir is not None:
            self.spec.log_dir.mkdir(parents=True, exist_ok=True)
        if self.redis is not None:
            self.redis.start()
            logger.info("redis: pid %d at %s (the replicas' shared state)", self.redis.pid,
                        self.state_url)
        for replica in self.replicas:
            replica.start()
            self._announce(replica)
        self.router.start()
        logger.info("router: pid %d on %s, policy %s", self.router.pid, self.router_url,
                    self.spec.policy)
        if self.front is not None:
            self.front.start()
            logger.info("front (nginx): pid %d on %s, /files to the replicas, the rest to "
                        "the router", self.front.pid, self.url)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        logger.info("cluster ready: %s routes to %d replica(s) (%s)", self.url,
                    len(self.replicas), ", ".join(self.replica_urls()))

    def _announce(self, replica: Child) -> None:
        port = self.ports[self.replicas.index(replica)]
        logger.info("replica %s: pid %d on http://%s:%d", replica.name, replica.pid,
                    REPLICA_HOST, port)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.spec.ready_timeout
        with httpx.Client(timeout=2) as client:
            while time.monotonic() < deadline:
                for child in self.children():
                    status = child.exited()
                    if status is not None:
                        raise ClusterError(f"{child.name} exited with status {status} "
                                           f"before the cluster was ready{child.log_tail()}")
                if self.stopping.is_set():
                    raise ClusterError("stopped before the cluster was ready")
                if self._all_healthy(client):
                    return
                time.sleep(0.2)
        raise ClusterError(f"not ready after {self.spec.ready_timeout:.0f} s")

    def _all_healthy(self, client: httpx.Client) -> bool:
        """Every replica answers /health 200 and the router lists them all as healthy."""
        try:
            if any(client.get(f"{url}/health").status_code != 200
                   for url in self.replica_urls()):
                return False
            workers = client.get(f"{self.admin_url}/workers").json()["workers"]
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        return len(workers) == len(self.replicas) and all(w["is_healthy"] for w in workers)

    def supervise(self) -> None:
        """Until stop(): restart whichever child exits (a replica on its own port, so the
        router's worker list stays right; the router on the cluster's). A dead replica is
        out of the router's list at once, and back once its replacement is ready."""
        while not self.stopping.wait(POLL_S):
            for child in self.children():
                self._restart_if_exited(child)
            for url in self.workers.restore_ready():
                logger.info("replica %s: back in the router's list (/health 200)",
                            self.replicas[self.replica_urls().index(url)].name)

    def _restart_if_exited(self, child: Child) -> None:
        status = child.exited()
        if status is None or self.stopping.is_set():
            return
        now = time.monotonic()
        if child.not_before == 0.0:  # first seen dead: decide when to restart it
            quick = now - child.started_at < STABLE_AFTER_S
            pause = min(30.0, 2.0 ** child.restarts) if quick else 0.0
            child.restarts = child.restarts + 1 if quick else 0
            child.not_before = now + pause
            how = f"signal {-status}" if status < 0 else f"status {status}"
            logger.warning("%s (pid %d) exited with %s: restarting it%s", child.name,
                           child.pid, how, f" in {pause:.0f} s" if pause else "")
            self._on_death(child)
        if now >= child.not_before:
            child.not_before = 0.0
            child.start()
            if child in self.replicas:
                self._announce(child)
            else:
                logger.info("%s: pid %d", child.name, child.pid)

    def _on_death(self, child: Child) -> None:
        """Keep the router's list in step: a dead replica leaves it before its restart;
        a restarted router lists every replica again."""
        if child in self.replicas:
            url = self.replica_urls()[self.replicas.index(child)]
            if self.workers.remove(url):
                logger.info("replica %s: out of the router's list until its replacement "
                            "is ready", child.name)
        elif child is self.router:
            self.workers.forget()

    def stop(self) -> None:
        """Drain, then stop: replicas first (SIGTERM: running requests finish, new ones get
        503), the router last, so that answers under way still reach their clients."""
        self.stopping.set()
        for replica in self.replicas:
            replica.signal(signal.SIGTERM)
        for replica in self.replicas:
            replica.wait(self.spec.drain_timeout + 15)
        self.router.signal(signal.SIGTERM)
        self.router.wait(10)
        if self.front is not None:
            self.front.signal(signal.SIGQUIT)  # nginx's graceful stop
            self.front.wait(10)
        if self.redis is not None:
            self.redis.signal(signal.SIGTERM)
            self.redis.wait(10)
        self.workers.close()
        logger.info("cluster stopped")

    def kill(self) -> None:
        for child in self.children():
            child.signal(signal.SIGKILL)


def free_port(host: str = REPLICA_HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def replica_snapshot(path: Path | None, index: int) -> dict[str, str]:
    """Each replica's own state snapshot file beside the configured one: without a shared
    store each replica keeps its own stores, and one file for all would be claimed by the
    first replica alone (server.store.snapshot.claim), the others keeping none."""
    if path is None:
        return {}
    return {"VLSERVE_STATE_SNAPSHOT": str(path.with_name(f"{path.stem}.r{index}{path.suffix}"))}
