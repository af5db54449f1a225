"""Cluster benchmark (the project's own, see bench/__init__): which vllm-router policy keeps
multi-turn image chats on their KV prefix, aggregate tok/s with 1 vs 2 replicas, and the
router's cost in time to first token.

    python -m bench.cluster [--size tiny|bench] [--sessions 8] [--turns 3] [--reps 10]

Replicas get one llama.cpp thread each. A turn counts as a prefix hit when its
cached_tokens cover the whole previous turn's prompt (image included).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.client import image_turn, photo_data_url
from server.cluster import Cluster, ClusterSpec
from server.cluster.child import Child, child_env
from server.cluster.cluster import free_port
from server.cluster.router import router_argv
from server.demo_model import make_demo_model

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
POLICIES = ("consistent_hash", "cache_aware", "power_of_two", "round_robin")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "bench"), default="tiny")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10, help="TTFT samples per path")
    parser.add_argument("--clients", type=int, default=4, help="concurrent streams for tok/s")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        models = make_demo_model(Path(tmp) / "models", size=args.size)
        spec = ClusterSpec(model=models.text, mmproj=models.mmproj, port=free_port(),
                           threads_per_replica=1, log_dir=Path(tmp) / "logs",
                           replica_env={"VLSERVE_N_CTX": "8192",
                                        "VLSERVE_DEFAULT_MAX_TOKENS": "64",
                                        # a slot per session: routing, not slot count
                                        "VLSERVE_N_PARALLEL": "8"})
        print("policy            header  turn-2/3 prefix hits  cached tokens (mean)  "
              "sessions kept / moved  sessions per replica")
        with running(_cluster(spec, 2)) as cluster:
            for seed, policy in enumerate(POLICIES):
                for header in (True, False):
                    with router(policy, cluster.replica_urls(), Path(tmp)) as url:
                        report_sessions(policy, header, url, args, seed * 100 + header * 50)
            ttft_direct = ttft(cluster.replica_urls()[0], args.reps)
            ttft_router = ttft(cluster.url, args.reps)
            tps2 = tok_per_s(cluster.url, args.clients)
        with running(_cluster(spec, 1)) as cluster:
            tps1 = tok_per_s(cluster.url, args.clients)
    print(f"\nTTFT (median of {args.reps}, max_tokens=1): direct {ttft_direct * 1000:.1f} ms, "
          f"through the router {ttft_router * 1000:.1f} ms "
          f"(+{(ttft_router - ttft_direct) * 1000:.1f} ms)")
    print(f"aggregate tok/s, {args.clients} streams of 64 tokens: 1 replica {tps1:.0f}, "
          f"2 replicas {tps2:.0f} ({tps2 / tps1:.2f}x)")
    return 0


@contextmanager
def running(cluster: Cluster) -> Iterator[Cluster]:
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _cluster(spec: ClusterSpec, replicas: int) -> Cluster:
    spec.replicas = replicas
    spec.port = free_port()
    return Cluster(spec)


@contextmanager
def router(policy: str, workers: list[str], log_dir: Path) -> Iterator[str]:
    """A second router, with another policy, in front of the same replicas."""
    port = free_port()
    child = Child(f"router-{policy}", router_argv(
        host="127.0.0.1", port=port, workers=workers, policy=policy,
        prometheus_port=free_port(), startup_timeout=60), child_env({}), log_dir)
    child.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        child.signal(15)
        child.wait(10)


def report_sessions(policy: str, header: bool, url: str, args: argparse.Namespace,
                    seed: int) -> None:
    hits, cached, replicas = run_sessions(url, args.sessions, args.turns, header, seed)
    total = args.sessions * (args.turns - 1)
    kept = sum(1 for r in replicas if len(r) == 1)
    # Where each session's first turn went: all on one replica is no load balancing.
    spread = Counter(sorted(r)[0] for r in replicas if len(r) == 1)
    print(f"{policy:<17} {'yes' if header else 'no':<7} {hits:>3}/{total:<18} "
          f"{statistics.mean(cached):>8.0f}              {kept:>2} / {len(replicas) - kept:<16}"
          + (", ".join(f"{name}: {n}" for name, n in sorted(spread.items())) or "-"))


def run_sessions(url: str, sessions: int, turns: int, header: bool, seed: int
                 ) -> tuple[int, list[int], list[set[str]]]:
    """Every session's turns in step (all first turns together, then all second...)."""
    chats = [[SYSTEM, image_turn(f"Session {seed + i}: what is in this picture?",
                                 photo_data_url(320, 240, seed + i))] for i in range(sessions)]
    previous = [0] * sessions
    hits, cached, replicas = 0, [], [set() for _ in range(sessions)]
    with httpx.Client(timeout=300) as client, ThreadPoolExecutor(sessions) as pool:
        for turn in range(turns):
            def one(i: int) -> httpx.Response:
                headers = {"X-Session-ID": f"bench-{seed}-{i}"} if header else {}
                return client.post(f"{url}/v1/chat/completions", headers=headers, json={
                    "messages": chats[i], "max_tokens": 16, "temperature": 0})
            for i, answer in enumerate(pool.map(one, range(sessions))):
                answer.raise_for_status()
                body = answer.json()
                usage = body["usage"]
                replicas[i].add(answer.headers.get("x-vlserve-replica", "?"))
                if turn:
                    got = usage["prompt_tokens_details"]["cached_tokens"]
                    cached.append(got)
                    hits += got >= previous[i]
                previous[i] = usage["prompt_tokens"]
                chats[i] += [{"role": "assistant",
                              "content": body["choices"][0]["message"]["content"]},
                             {"role": "user", "content": f"Turn {turn + 2}: tell me more."}]
    return hits, cached, replicas


def ttft(url: str, reps: int) -> float:
    times = []
    with httpx.Client(timeout=60) as client:
        for rep in range(reps + 1):
            started = time.perf_counter()
            client.post(f"{url}/v1/chat/completions", headers={"X-Session-ID": "ttft"}, json={
                "messages": [SYSTEM, {"role": "user", "content": "Hello."}],
                "max_tokens": 1}).raise_for_status()
            if rep:  # the first one warms the connection and the prefix
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def tok_per_s(url: str, clients: int) -> float:
    def one(i: int) -> int:
        answer = httpx.post(f"{url}/v1/chat/completions", timeout=600,
                            headers={"X-Session-ID": f"tps-{i}"}, json={
                                "messages": [SYSTEM, {"role": "user", "content":
                                             f"Client {i}: write a poem."}],
                                "max_tokens": 64, "temperature": 0})
        answer.raise_for_status()
        return int(answer.json()["usage"]["completion_tokens"])

    tok_per_s_runs = []
    for _ in range(3):
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            tokens = sum(pool.map(one, range(clients)))
        tok_per_s_runs.append(tokens / (time.perf_counter() - started))
    return statistics.median(tok_per_s_runs)


if __name__ == "__main__":
    raise SystemExit(main())
