"""What a `prediction` costs another client: a plain stream's time between tokens while a
predicted request runs beside it, against while a plain request does, same server.

    python -m bench.prediction_beside [--max-slowdown 100,1.5] [--tokens 192] [--reps 3]
                                      [--threads 2] [--model ...]

One vlserve (two slots) per `--max-slowdown` value (100: in effect unbounded). Two
requests start together, both greedy and run to `--tokens`: the plain one ("Write a long
story about a fox and a crow.") is measured; beside it runs the same story with no
prediction, with its own answer as prediction ("exact") or the answer with every 10th word
changed ("edited"). Each cell: the plain stream's mean time between tokens (as its client
receives them) while the other request runs, median of `--reps`, and the ratio against
"beside none" on the same server; and the other request's own time per token (server
`timings`), as a ratio the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.prediction import CONFIG, GEMMA, PROMPT, ask, edited
from bench.servers import Server, start_vlserve, wait_quiet


def ms_per_token(answer: dict) -> float:
    return answer["timings"]["generation"] / answer["usage"]["completion_tokens"]


def streamed(server: Server, tokens: int) -> tuple[str, list[float]]:
    """The plain story, streamed: its text and when each token arrived."""
    body = {"model": "m", "messages": PROMPT, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    text, arrivals = [], []
    with httpx.stream("POST", f"{server.url}/chat/completions", json=body,
                      timeout=600) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            if choices and choices[0]["delta"].get("content"):
                text.append(choices[0]["delta"]["content"])
                arrivals.append(time.perf_counter())
    return "".join(text), arrivals


def finished(server: Server, tokens: int, prediction: str | None) -> tuple[dict, float]:
    answer = ask(server, tokens, prediction)
    return answer, time.perf_counter()


def gap_while(arrivals: list[float], until: float) -> float:
    """Mean time between the tokens that arrived before `until`."""
    during = [t for t in arrivals if t <= until]
    if len(during) < 3:
        raise SystemExit("the plain stream had too few tokens beside the other request")
    return (during[-1] - during[0]) / (len(during) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=GEMMA)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--tokens", type=int, default=192)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-slowdown", default="100,1.5")
    args = parser.parse_args()
    bounds = args.max_slowdown.split(",")
    servers: dict[str, Server] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for bound in bounds:
                os.environ["VLSERVE_PREDICTION_MAX_SLOWDOWN"] = bound
                log_dir = Path(tmp) / f"bound{bound}"
                log_dir.mkdir()
                servers[bound] = start_vlserve(args.model, None, log_dir, threads=args.threads,
                                               n_parallel=2, config=args.config)
            run(servers, args.tokens, args.reps)
        finally:
            for server in servers.values():
                server.stop()


def run(servers: dict[str, Server], tokens: int, reps: int) -> None:
    first = next(iter(servers.values()))
    reference = ask(first, tokens, None)["choices"][0]["message"]["content"]
    cases = {"none": None, "exact": reference, "edited": edited(reference, 10)}
    runs = [(bound, case) for bound in servers for case in cases]
    plain_ms: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    own_ms: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    with ThreadPoolExecutor(2) as pool:
        for rep in range(reps):
            shift = rep % len(runs)
            for bound, case in runs[shift:] + runs[:shift]:
                server = servers[bound]
                wait_quiet(list(servers.values()))
                plain = pool.submit(streamed, server, tokens)
                predicted = pool.submit(finished, server, tokens, cases[case])
                (text, arrivals), (answer, ended) = plain.result(), predicted.result()
                if reference != text or reference != answer["choices"][0]["message"]["content"]:
                    raise SystemExit(f"max_slowdown {bound}, {case}: the answer changed")
                plain_ms[(bound, case)].append(gap_while(arrivals, ended) * 1000)
                own_ms[(bound, case)].append(ms_per_token(answer))
    print(f"\n{tokens} tokens each, greedy, two requests started together; the plain "
          f"stream's ms between tokens while the other runs, and the other's ms per token; "
          f"median of {reps}; ratios vs the same server's 'none'")
    print("| max_slowdown | beside the plain stream | plain stream ms between tokens | ratio | "
          "other request's ratio |")
    print("|---|---|---|---|---|")
    for bound, case in runs:
        plain = statistics.median(plain_ms[(bound, case)])
        base = statistics.median(plain_ms[(bound, "none")])
        own = statistics.median(own_ms[(bound, case)]) / statistics.median(
            own_ms[(bound, "none")])
        print(f"| {bound} | {case} | {plain:.2f} | {plain / base:.2f} | {own:.2f} |")


if __name__ == "__main__":
    main()
