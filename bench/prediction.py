"""Predicted Outputs: time per generated token with a `prediction` vs without, same server.

    python -m bench.prediction [--model models/gemma3-270m/gemma-3-270m-q4_k_m.gguf]
                               [--tokens 256] [--reps 3] [--threads 2] [--max-draft 16]

One vlserve per `--max-draft` value (comma-separated), each serving the model alone with
one slot. The case: "Write a long story about a fox and a crow.", greedy, run to
`--tokens` (ignore_eos). The model's own answer without a prediction is the reference;
then, measured in turn (the order rotates each repetition) on every server:
- none: no prediction, the baseline;
- exact: the reference itself (every draft can be kept: the upper bound);
- edited: the reference with every 10th word changed (an edit: drafts are taken back
  where the text differs, and the lookup finds its place after each change);
- dense edits: every 3rd word changed (little of any draft can be kept);
- unrelated: text the answer never follows (what a useless prediction costs).
Each cell is the server's own generation time per completion token (`timings`), median of
`--reps`; the ratio is against `none` on the same server in the same run. Every answer is
checked to be the reference (a prediction must never change it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import httpx

from bench.servers import Server, start_vlserve, wait_quiet

GEMMA = Path("models/gemma3-270m/gemma-3-270m-q4_k_m.gguf")
CONFIG = Path("configs/gemma3-270m.yaml")
PROMPT = [{"role": "user", "content": "Write a long story about a fox and a crow."}]
UNRELATED = ("Quarterly tax forms, invoices and ledgers are filed by the accounting "
             "department before the end of each fiscal period. ") * 8


def ask(server: Server, tokens: int, prediction: str | None) -> dict:
    body: dict = {"model": "m", "messages": PROMPT, "max_tokens": tokens, "temperature": 0,
                  "ignore_eos": True}
    if prediction is not None:
        body["prediction"] = {"type": "content", "content": prediction}
    reply = httpx.post(f"{server.url}/chat/completions", json=body, timeout=600)
    reply.raise_for_status()
    return reply.json()


def edited(text: str, every: int) -> str:
    words = text.split(" ")
    return " ".join(w.upper() if i % every == every // 2 else w for i, w in enumerate(words))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=GEMMA)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-draft", default="16")
    args = parser.parse_args()
    drafts = [int(d) for d in args.max_draft.split(",")]
    servers: dict[int, Server] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for draft in drafts:
                os.environ["VLSERVE_PREDICTION_MAX_DRAFT"] = str(draft)
                log_dir = Path(tmp) / f"draft{draft}"
                log_dir.mkdir()
                servers[draft] = start_vlserve(args.model, None, log_dir,
                                               threads=args.threads, n_parallel=1,
                                               config=args.config)
            run(servers, args.tokens, args.reps)
        finally:
            for server in servers.values():
                server.stop()


def run(servers: dict[int, Server], tokens: int, reps: int) -> None:
    first = next(iter(servers.values()))
    reference = ask(first, tokens, None)["choices"][0]["message"]["content"]
    cases = {"none": None, "exact": reference, "edited": edited(reference, 10),
             "dense edits": edited(reference, 3), "unrelated": UNRELATED}
    runs = [(draft, case) for draft in servers for case in cases]
    ms: dict[tuple[int, str], list[float]] = {key: [] for key in runs}
    kept: dict[tuple[int, str], tuple[int, int]] = {}
    for rep in range(reps):
        shift = rep % len(runs)
        for draft, case in runs[shift:] + runs[:shift]:
            server = servers[draft]
            wait_quiet(list(servers.values()))
            answer = ask(server, tokens, cases[case])
            if answer["choices"][0]["message"]["content"] != reference:
                raise SystemExit(f"max_draft {draft}, {case}: the answer changed")
            usage = answer["usage"]
            details = usage["completion_tokens_details"]
            ms[(draft, case)].append(answer["timings"]["generation"] / usage["completion_tokens"])
            kept[(draft, case)] = (details["accepted_prediction_tokens"],
                                   details["rejected_prediction_tokens"])
    print(f"\n{tokens} tokens, greedy, ms per generated token (server timings), median of "
          f"{reps}; ratio vs no prediction on the same server")
    print("| max_draft | case | ms/token | ratio | accepted / rejected drafts |")
    print("|---|---|---|---|---|")
    for draft, case in runs:
        median = statistics.median(ms[(draft, case)])
        base = statistics.median(ms[(draft, "none")])
        accepted, rejected = kept[(draft, case)]
        print(f"| {draft} | {case} | {median:.2f} | {median / base:.2f} | "
              f"{accepted} / {rejected} |")


if __name__ == "__main__":
    main()
