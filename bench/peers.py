"""vlserve vs llama.cpp's own C++ llama-server, side by side on the same models and threads.

    python -m bench.peers [--threads 2] [--reps 3] [--cases gemma,bench,tiny]
                          [--llama-bin DIR]

llama-server comes from the exact llama.cpp that llama-cpp-python 0.3.36 vendors
(`../shared/tools/build-llama-server.sh` builds it, about 10 minutes once; or give --llama-bin
/ VLSERVE_LLAMA_BIN). Both servers run at once with 4 slots and one shared 4096-cell KV
cache. Each measurement starts once neither works in the background (vlserve evaluates a
next turn ahead after answering: on shared cores that would slow whichever comes next), and
the order alternates every repetition so background load hits both alike. Cases: the real
gemma-3-270m Q4_K_M (262k vocabulary), the bench-size demo model (with its projector:
turn-2 image TTFT) and the tiny demo model, where the model costs almost nothing and the
servers' own per-token work shows. Prints medians and vlserve/llama-server ratios against
the goals of issue 17.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.client import image_turn, photo_data_url
from bench.servers import Server, free_port, start, start_vlserve, wait_quiet
from server.demo_model import demo_model_paths, make_demo_model

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT.parent / "shared" / "tools" / "build-llama-server.sh"
GEMMA = ROOT / "models" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
N_CTX = 4096
N_PARALLEL = 4
STORY = "Tell a long story about a lighthouse keeper, number {tag}."


@dataclass(frozen=True)
class Case:
    name: str
    model: Path
    mmproj: Path | None
    config: Path | None  # vlserve's preset (chat template, names); None: the default
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class Goal:
    label: str
    higher_is_better: bool
    bound: float  # the ratio vlserve / llama-server must reach (≥) or stay under (≤)
    info: bool = False  # a reading that explains the others, not one of issue 17's goals

    def met(self, ratio: float) -> bool:
        return ratio >= self.bound if self.higher_is_better else ratio <= self.bound


GOALS = {
    "decode_tps": Goal("single-stream decode, tok/s", True, 1.0),
    "aggregate_tps_4": Goal("aggregate, 4 clients, tok/s", True, 1.05),
    "ms_per_token": Goal("server time per generated token, ms", False, 0.6),
    # Each server's own account of a 256-token answer: decode speed without the request
    # overhead, prompt evaluation or one-off work (a RAM spill) the client-side rate holds.
    "decode_ms_server": Goal("server time per generated token, ms", False, 1.0, info=True),
    "turn2_ttft_s": Goal("2-turn image chat, turn-2 TTFT (0.5 s later), s", False, 0.5),
    "turn2_at_once_ttft_s": Goal("2-turn image chat, turn-2 TTFT (at once), s", False, 0.5),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cases", default="gemma,bench,tiny")
    parser.add_argument("--llama-bin", type=Path, default=os.environ.get("VLSERVE_LLAMA_BIN"))
    parser.add_argument("--dir", type=Path, default=ROOT / "models" / "bench")
    args = parser.parse_args(argv)
    llama_bin = args.llama_bin or build_llama_server()
    log_dir = Path(tempfile.mkdtemp(prefix="vlserve-peers-"))
    rows: list[tuple[str, str, float, float]] = []
    for case in cases(args.cases.split(","), args.dir):
        print(f"{case.name}: starting both servers ({args.threads} threads each)", flush=True)
        ours = start_vlserve(case.model, case.mmproj, log_dir, threads=args.threads,
                             n_parallel=N_PARALLEL, config=case.config, n_ctx=N_CTX)
        try:
            theirs = start_llama_server(llama_bin, case, log_dir, args.threads)
        except BaseException:
            ours.stop()
            raise
        try:
            results = measure_alternating(case, [ours, theirs], args.reps)
        finally:
            ours.stop()
            theirs.stop()
        for metric in case.metrics:
            rows.append((case.name, metric, results[ours.name][metric],
                         results[theirs.name][metric]))
    print_table(rows)
    print(f"\nserver logs: {log_dir}")
    return 0


def build_llama_server() -> Path:
    if not BUILD_SCRIPT.is_file():
        raise SystemExit(f"no llama-server: give --llama-bin or VLSERVE_LLAMA_BIN (the build "
                         f"script {BUILD_SCRIPT} is not here)")
    print("building llama-server (once, about 10 minutes)...", flush=True)
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, capture_output=True,
                         text=True).stdout
    return Path(out.strip().splitlines()[-1])


def cases(names: list[str], bench_dir: Path) -> list[Case]:
    out: list[Case] = []
    for name in names:
        if name == "gemma":
            if not GEMMA.is_file():
                raise SystemExit(f"{GEMMA} is missing: `vlserve download gemma3-270m` (or "
                                 "`make test`, which assembles it) writes it")
            out.append(Case("gemma-3-270m", GEMMA, None, ROOT / "configs" / "gemma3-270m.yaml",
                            ("decode_tps", "decode_ms_server", "aggregate_tps_4")))
        elif name in ("bench", "tiny"):
            folder = bench_dir if name == "bench" else bench_dir.parent / "tiny"
            size = "bench" if name == "bench" else "tiny"
            paths = demo_model_paths(folder, size, "llava")
            if not (paths.text.is_file() and paths.mmproj.is_file()):
                paths = make_demo_model(folder, size=size)
            metrics = ("decode_tps", "decode_ms_server", "aggregate_tps_4", "turn2_ttft_s",
                       "turn2_at_once_ttft_s") if name == "bench" \
                else ("ms_per_token",)
            out.append(Case(f"{name} demo", paths.text, paths.mmproj, None, metrics))
        else:
            raise SystemExit(f"unknown case {name!r} (gemma, bench, tiny)")
    return out


def start_llama_server(bin_dir: Path, case: Case, log_dir: Path, threads: int) -> Server:
    port = free_port()
    args = [str(bin_dir / "llama-server"), "-m", str(case.model), "--port", str(port),
            "--host", "127.0.0.1", "-t", str(threads), "-tb", str(threads),
            "-c", str(N_CTX), "-np", str(N_PARALLEL), "--kv-unified", "--no-webui"]
    if case.mmproj is not None:
        args += ["--mmproj", str(case.mmproj)]
    return start("llama-server", args, "/health", log_dir, port, python=False)


def measure_alternating(case: Case, servers: list[Server], reps: int
                        ) -> dict[str, dict[str, float]]:
    samples: dict[str, dict[str, list[float]]] = {s.name: {} for s in servers}
    with httpx.Client(limits=httpx.Limits(max_connections=16), timeout=600) as client:
        for server in servers:  # one untimed round: first-call allocations, caches
            for metric in case.metrics:
                METRICS[metric](client, server, -1)
        for rep in range(reps):
            for server in servers if rep % 2 == 0 else servers[::-1]:
                for metric in case.metrics:
                    wait_quiet(servers)
                    value = METRICS[metric](client, server, rep)
                    samples[server.name].setdefault(metric, []).append(value)
    return {name: {m: statistics.median(v) for m, v in per.items()}
            for name, per in samples.items()}


def complete(client: httpx.Client, server: Server, messages: list[dict], max_tokens: int
             ) -> tuple[float, dict]:
    """One greedy non-streaming request that runs to max_tokens: (seconds, reply)."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    started = time.perf_counter()
    resp = client.post(f"{server.url}/chat/completions", json=body)
    resp.raise_for_status()
    return time.perf_counter() - started, resp.json()


def story(tag: object) -> list[dict]:
    return [{"role": "user", "content": STORY.format(tag=tag)}]


def decode_tps(client: httpx.Client, server: Server, rep: int) -> float:
    """Tokens per second of decoding alone, as a client sees it: two fresh prompts of equal
    length, 8 and 264 tokens; the time difference is 256 tokens of decoding."""
    short_s, short = complete(client, server, story(f"s{rep}"), 8)
    long_s, long = complete(client, server, story(f"l{rep}"), 264)
    tokens = long["usage"]["completion_tokens"] - short["usage"]["completion_tokens"]
    return tokens / max(long_s - short_s, 1e-9)


def aggregate_tps_4(client: httpx.Client, server: Server, rep: int) -> float:
    def one(i: int) -> int:
        _, reply = complete(client, server, story(f"c{i}r{rep}"), 128)
        return int(reply["usage"]["completion_tokens"])

    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        tokens = sum(pool.map(one, range(4)))
    return tokens / (time.perf_counter() - started)


def ms_per_token(client: httpx.Client, server: Server, rep: int) -> float:
    """The server's own account of its time per generated token (vlserve: generation /
    completion_tokens; llama-server: predicted_per_token_ms)."""
    _, reply = complete(client, server, story(f"t{rep}"), 256)
    timings = reply["timings"]
    if "predicted_per_token_ms" in timings:
        return float(timings["predicted_per_token_ms"])
    return timings["generation"] / reply["usage"]["completion_tokens"]


def turn2_ttft_s(client: httpx.Client, server: Server, rep: int, think_s: float = 0.5
                 ) -> float:
    """Turn 2 of an image chat, sent `think_s` after turn 1's answer (someone reading it;
    an app takes a network round trip at least)."""
    image = photo_data_url(1024, 768, seed=500 + rep)
    turn1 = [image_turn("What is in this picture?", image)]
    _, answer = complete(client, server, turn1, 16)
    turn2 = [*turn1, {"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
             {"role": "user", "content": "What colour dominates?"}]
    time.sleep(think_s)
    seconds, _ = complete(client, server, turn2, 1)
    return seconds


def turn2_at_once_ttft_s(client: httpx.Client, server: Server, rep: int) -> float:
    """The same, turn 2 sent the moment turn 1's answer arrives (a script)."""
    return turn2_ttft_s(client, server, rep + 1000, think_s=0.0)


METRICS: dict[str, Callable[[httpx.Client, Server, int], float]] = {
    "decode_tps": decode_tps, "aggregate_tps_4": aggregate_tps_4,
    "ms_per_token": ms_per_token, "decode_ms_server": ms_per_token, "turn2_ttft_s": turn2_ttft_s,
    "turn2_at_once_ttft_s": turn2_at_once_ttft_s}


def print_table(rows: list[tuple[str, str, float, float]]) -> None:
    lines = [(f"{case}: {GOALS[m].label}", ours, theirs, ours / theirs if theirs else
              float("nan"), GOALS[m]) for case, m, ours, theirs in rows]
    width = max(len(line[0]) for line in lines)
    print(f"\n{'metric':<{width}}  {'vlserve':>9}  {'llama-srv':>9}  {'ratio':>6}  goal")
    for name, ours, theirs, ratio, goal in lines:
        sign = "≥" if goal.higher_is_better else "≤"
        verdict = "met" if goal.met(ratio) else "NOT met"
        target = "(for reading the rows above)" if goal.info \
            else f"{sign} {goal.bound:g} ({verdict})"
        print(f"{name:<{width}}  {ours:9.3f}  {theirs:9.3f}  {ratio:6.2f}  {target}")


if __name__ == "__main__":
    raise SystemExit(main())
