"""`vlserve cluster`: the command line of server.cluster."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path
from types import FrameType

from server.cluster.cluster import Cluster, ClusterError, ClusterSpec
from server.cluster.router import DEFAULT_POLICY, POLICIES
from server.cluster.state import maxmemory_mb
from server.config import ConfigError, load_settings

logger = logging.getLogger("vlserve.cluster")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", type=int, default=2, help="vlserve replicas (default 2)")
    parser.add_argument("--model", type=Path, help="text model GGUF (default: the preset's)")
    parser.add_argument("--mmproj", type=Path, help="vision projector (mmproj) GGUF")
    parser.add_argument("--config", type=Path, help="YAML preset every replica serves with")
    parser.add_argument("--host", default="127.0.0.1", help="where the router listens")
    parser.add_argument("--port", type=int, default=7860, help="the router's port")
    parser.add_argument("--router-policy", choices=POLICIES, default=DEFAULT_POLICY,
                        help=f"how the router picks a replica (default {DEFAULT_POLICY}: "
                        "by the X-Session-ID header)")
    parser.add_argument("--threads-per-replica", type=int, default=0,
                        help="llama.cpp threads per replica (default: the cores shared out)")
    parser.add_argument("--gpus", default="", metavar="IDS",
                        help="GPU ids handed out in turn, e.g. 0,1: replica i gets one as "
                        "CUDA_VISIBLE_DEVICES (default: each sees every GPU)")
    parser.add_argument("--replica-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for every replica, e.g. "
                        "VLSERVE_N_PARALLEL=8 or VLSERVE_STATE_URL=redis://... (repeatable)")
    parser.add_argument("--router-arg", action="append", default=[], metavar="ARG",
                        help="an extra vllm-router argument, e.g. --router-arg=--log-level "
                        "--router-arg=warning (repeatable)")
    state = parser.add_mutually_exclusive_group()
    state.add_argument("--redis", action="store_true",
                       help="start a loopback redis-server as the replicas' shared state "
                       "(uploads, stored responses) and nginx on --port in front of the "
                       "router, so uploads work through the one address")
    state.add_argument("--state-url", metavar="URL",
                       help="the replicas' shared store (redis://host:port/db), with the "
                       "nginx front as for --redis")
    parser.add_argument("--redis-maxmemory", type=int, metavar="MB",
                        help="--redis's memory bound (default: upload_store_mb + "
                        "responses_store_mb + conversations_store_mb + "
                        "chat_completions_store_mb + batch_store_mb (1024 on a shared "
                        "store) + 256)")
    parser.add_argument("--log-dir", type=Path, help="write each child's log to DIR/<name>.log "
                        "(default: on stderr, each line tagged with r0, r1, ..., router)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds replicas get to finish requests on shutdown (default 30)")
    parser.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds to wait for every replica to load (default 600)")


def spec_from_args(args: argparse.Namespace) -> ClusterSpec:
    if args.replicas < 1:
        raise ConfigError("--replicas must be at least 1")
    if args.redis_maxmemory is not None and args.redis_maxmemory < 1:
        raise ConfigError("--redis-maxmemory must be at least 1 (MB)")
    env: dict[str, str] = {}
    for item in args.replica_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--replica-env wants NAME=VALUE, not {item!r}")
        env[name] = value
    # One replica's settings (its VLSERVE_* variables included), checked here: a bad preset
    # is one line and exit 2, not N replicas failing in turn.
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("VLSERVE_")})
    try:
        settings = load_settings(args.config, model=args.model, mmproj=args.mmproj)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return ClusterSpec(model=args.model, mmproj=args.mmproj, config=args.config,
                       host=args.host, port=args.port, replicas=args.replicas,
                       policy=args.router_policy, threads_per_replica=args.threads_per_replica,
                       replica_env=env, router_args=tuple(args.router_arg),
                       gpus=tuple(g.strip() for g in args.gpus.split(",") if g.strip()),
                       log_dir=args.log_dir, ready_timeout=args.ready_timeout,
                       drain_timeout=args.drain_timeout, state_url=args.state_url,
                       local_redis=args.redis,
                       redis_maxmemory_mb=args.redis_maxmemory or maxmemory_mb(settings),
                       batch_dir=settings.batch_dir, state_snapshot=settings.state_snapshot)


def run(args: argparse.Namespace) -> int:
    from server.logs import setup_logging

    setup_logging("info")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not every readiness poll
    try:
        cluster = Cluster(spec_from_args(args))
    except (FileNotFoundError, RuntimeError) as exc:  # no nginx / redis-server, a bad conf
        logger.error("cluster did not start: %s", exc)
        return 2

    def on_signal(signum: int, _: FrameType | None) -> None:
        if cluster.stopping.is_set():  # a second Ctrl-C: no more waiting
            logger.warning("signal %d again: killing every replica and the router", signum)
            cluster.kill()
            return
        logger.info("signal %d: draining the replicas, then stopping the router", signum)
        cluster.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        cluster.start()
    except ClusterError as exc:
        if cluster.stopping.is_set():  # told to stop while starting: not a failure
            return 0
        logger.error("cluster did not start: %s", exc)
        return 1
    cluster.supervise()
    cluster.stop()
    return 0
