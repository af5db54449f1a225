"""Engine benchmark: vlserve vs llama-cpp-python's own server on the same bench-size model.

    python -m bench.engine [--dir models/bench] [--threads 2] [--reps 3]

Generates the bench model pair if missing (random weights, so every request generates
exactly max_tokens unless EOS happens to come up), starts both servers on loopback and
prints one table of medians with vlserve/baseline ratios and the targets of issue 4.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.client import ChatResult, chat, image_turn, photo_data_url
from bench.servers import Server, start_llama_cpp_server, start_vlserve
from server.demo_model import make_demo_model

Row = tuple[str, float, float, str]  # metric, vlserve, baseline, target note
# Sent explicitly: llama_cpp.server's llava-1-5 format otherwise adds its own long system
# prompt, and both servers must evaluate the same prompt for TTFTs to be comparable.
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("models/bench"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)

    paths = make_demo_model(args.dir, size="bench") if not (
        args.dir / "bench-llava-text.gguf").is_file() else None
    text = paths.text if paths else args.dir / "bench-llava-text.gguf"
    mmproj = paths.mmproj if paths else args.dir / "bench-llava-mmproj.gguf"
    log_dir = Path(tempfile.mkdtemp(prefix="vlserve-bench-"))
    results: dict[str, dict[str, float]] = {}
    for name, starter in (
        ("vlserve", lambda: start_vlserve(text, mmproj, log_dir, threads=args.threads,
                                          n_parallel=4)),
        ("baseline", lambda: start_llama_cpp_server(text, mmproj, log_dir,
                                                    threads=args.threads)),
    ):
        server = starter()
        try:
            print(f"{name}: ready after {server.ready_after_s:.1f} s, measuring...", flush=True)
            results[name] = measure(server, args.reps)
        finally:
            server.stop()
    print_table(results)
    print(f"\nserver logs: {log_dir}")
    return 0


def measure(server: Server, reps: int) -> dict[str, float]:
    out: dict[str, float] = {}
    url = server.url
    with httpx.Client(limits=httpx.Limits(max_connections=16)) as client:
        # Warm-up check first: the very first image request after readiness (TTFT).
        out["first_image_ttft_s"] = chat(client, url, [SYSTEM, image_turn(
            "Describe.", photo_data_url(1024, 768, seed=1000))], max_tokens=1).seconds
        out["steady_image_ttft_s"] = median_of(reps, lambda i: chat(client, url, [
            SYSTEM, image_turn("Describe.", photo_data_url(1024, 768, seed=1001 + i))],
            max_tokens=1).seconds)
        out["turn2_ttft_s"] = median_of(reps, lambda i: two_turn_ttft(client, url, i))
        out["text_ttft_s"] = median_of(reps, lambda i: chat(client, url, [SYSTEM, story(
            f"a{i}")], max_tokens=1).seconds)
        out["decode_tps"] = median_of(reps, lambda i: decode_rate(client, url, i))
        for n in (1, 2, 4):
            out[f"aggregate_tps_{n}"] = median_of(reps, lambda i, n=n: aggregate_tps(
                client, url, n, i))
    return out


def story(tag: str) -> dict:
    return {"role": "user", "content": f"Tell a long story, number {tag}."}


def decode_rate(client: httpx.Client, url: str, rep: int) -> float:
    """Generation speed without prompt evaluation: two cold prompts of equal length, 8 and
    136 tokens; the difference in time is 128 tokens of decoding."""
    short = chat(client, url, [SYSTEM, story(f"s{rep}")], max_tokens=8)
    long = chat(client, url, [SYSTEM, story(f"l{rep}")], max_tokens=136)
    return (long.tokens - short.tokens) / max(long.seconds - short.seconds, 1e-9)


def two_turn_ttft(client: httpx.Client, url: str, rep: int) -> float:
    image = photo_data_url(1024, 768, seed=rep)
    turn1 = [SYSTEM, image_turn("What is in this picture?", image)]
    answer = chat(client, url, turn1, max_tokens=16)
    turn2 = [*turn1, {"role": "assistant", "content": answer.text},
             {"role": "user", "content": "What colour dominates?"}]
    return chat(client, url, turn2, max_tokens=1).seconds


def aggregate_tps(client: httpx.Client, url: str, clients: int, rep: int) -> float:
    def one(i: int) -> ChatResult:
        return chat(client, url, [SYSTEM, {"role": "user", "content":
                    f"Client {i} of round {rep}: write a poem."}], max_tokens=64)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    return sum(r.tokens for r in results) / (time.perf_counter() - started)


def median_of(reps: int, run: Callable[[int], float]) -> float:
    return statistics.median(run(i) for i in range(reps))


def print_table(results: dict[str, dict[str, float]]) -> None:
    v, b = results["vlserve"], results["baseline"]
    rows: list[Row] = [
        ("B1 turn-2 TTFT, image chat (s)", v["turn2_ttft_s"], b["turn2_ttft_s"],
         "ratio ≤ 0.15"),
        ("B2 aggregate tok/s, 1 client", v["aggregate_tps_1"], b["aggregate_tps_1"], ""),
        ("B2 aggregate tok/s, 2 clients", v["aggregate_tps_2"], b["aggregate_tps_2"], ""),
        ("B2 aggregate tok/s, 4 clients", v["aggregate_tps_4"], b["aggregate_tps_4"],
         "ratio ≥ 3; ≥ 1.6× own 1-client"),
        ("B3 single-stream decode tok/s", v["decode_tps"], b["decode_tps"], "ratio ≥ 1.25"),
        ("B3 text TTFT (s)", v["text_ttft_s"], b["text_ttft_s"], "ratio ≤ 0.5"),
        ("first image TTFT after ready (s)", v["first_image_ttft_s"], b["first_image_ttft_s"],
         ""),
        ("steady image TTFT (s)", v["steady_image_ttft_s"], b["steady_image_ttft_s"], ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'metric':<{width}}  {'vlserve':>9}  {'baseline':>9}  {'ratio':>6}  target")
    for name, mine, base, target in rows:
        ratio = mine / base if base else float("nan")
        print(f"{name:<{width}}  {mine:9.3f}  {base:9.3f}  {ratio:6.2f}  {target}")
    scaling = v["aggregate_tps_4"] / v["aggregate_tps_1"]
    warm = v["first_image_ttft_s"] / v["steady_image_ttft_s"]
    print(f"\nvlserve 4-client / 1-client throughput: {scaling:.2f}× (target ≥ 1.6)")
    print(f"vlserve first / steady image TTFT: {warm:.2f}× (target ≤ 1.2: warm-up works)")


if __name__ == "__main__":
    raise SystemExit(main())
