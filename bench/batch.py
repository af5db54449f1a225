"""The project's batch benchmark (issue 19), against a running server: N image questions as
one batch vs sequential requests vs 4 concurrent clients (throughput), and interactive
time to first token on an idle server vs while a batch runs.

    python -m bench.batch --url http://127.0.0.1:7860 -n 200 --max-tokens 64

Each image is asked `--questions` different questions, so prefix reuse and the embedding
cache get their chance in every mode alike. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from bench.client import image_turn, photo_data_url

QUESTIONS = ("What is in the picture?", "What colours do you see?", "Describe the shapes.",
             "Is it a photo or a drawing?")


def bodies(n: int, questions: int, max_tokens: int) -> list[dict]:
    images = [photo_data_url(640, 480, seed) for seed in range(max(1, n // questions + 1))]
    return [{"model": "bench", "max_tokens": max_tokens, "temperature": 0,
             "messages": [image_turn(QUESTIONS[i % questions % len(QUESTIONS)],
                                     images[i // questions])]} for i in range(n)]


def sequential(client: httpx.Client, api: str, work: list[dict], workers: int = 1) -> float:
    def one(body: dict) -> None:
        client.post(f"{api}/chat/completions", json=body, timeout=600).raise_for_status()

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, work))
    return len(work) / (time.perf_counter() - started)


def start_batch(client: httpx.Client, api: str, work: list[dict]) -> str:
    data = "".join(json.dumps({"custom_id": str(i), "method": "POST",
                               "url": "/v1/chat/completions", "body": body}) + "\n"
                   for i, body in enumerate(work)).encode()
    file = client.post(f"{api}/files", data={"purpose": "batch"},
                       files={"file": ("bench.jsonl", io.BytesIO(data))}, timeout=120)
    file.raise_for_status()
    batch = client.post(f"{api}/batches", json={"input_file_id": file.json()["id"],
                                                "endpoint": "/v1/chat/completions"})
    batch.raise_for_status()
    return str(batch.json()["id"])


def batch_status(client: httpx.Client, api: str, batch_id: str) -> dict:
    return dict(client.get(f"{api}/batches/{batch_id}", timeout=30).json())


def as_batch(client: httpx.Client, api: str, work: list[dict]) -> float:
    started = time.perf_counter()
    batch_id = start_batch(client, api, work)
    while batch_status(client, api, batch_id)["status"] not in (
            "completed", "failed", "expired", "cancelled"):
        time.sleep(0.05)
    return len(work) / (time.perf_counter() - started)


def ttft(client: httpx.Client, api: str, body: dict) -> float:
    """Seconds to the first streamed content chunk."""
    started = time.perf_counter()
    with client.stream("POST", f"{api}/chat/completions", json={**body, "stream": True},
                       timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content": "' in line \
                    and '"content": ""' not in line:
                return time.perf_counter() - started
    return time.perf_counter() - started


def ttfts(client: httpx.Client, api: str, probes: list[dict]) -> list[float]:
    results = []
    for body in probes:
        results.append(ttft(client, api, body))
        time.sleep(0.2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("-n", type=int, default=200, help="image questions per mode")
    parser.add_argument("--questions", type=int, default=4, help="questions per image")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--probes", type=int, default=10, help="interactive TTFT samples")
    args = parser.parse_args()
    api = args.url.rstrip("/") + "/api/v1"
    work = bodies(args.n, args.questions, args.max_tokens)
    probes = [{**body, "max_tokens": 8} for body in bodies(args.probes, 1, 8)]
    with httpx.Client() as client:
        rows = [("one batch", as_batch(client, api, work)),
                ("sequential", sequential(client, api, work)),
                ("4 concurrent clients", sequential(client, api, work, workers=4))]
        idle = ttfts(client, api, probes)
        batch_id = start_batch(client, api, work)
        busy = ttfts(client, api, probes)
        still_running = batch_status(client, api, batch_id)["status"] == "in_progress"
        client.post(f"{api}/batches/{batch_id}/cancel", timeout=30)
    print(f"| mode ({args.n} image questions, max_tokens {args.max_tokens}) | requests/s |")
    print("|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.2f} |")
    idle_ms, busy_ms = statistics.median(idle) * 1000, statistics.median(busy) * 1000
    print(f"\ninteractive TTFT, median of {args.probes}: idle {idle_ms:.0f} ms, during a "
          f"batch {busy_ms:.0f} ms ({busy_ms / idle_ms:.2f}x; target <= 1.2x)"
          + ("" if still_running else " -- the batch ended before the last probe: use a "
             "larger -n"))


if __name__ == "__main__":
    main()
