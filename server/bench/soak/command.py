"""`vlserve bench soak` (and `python -m bench.soak`): arguments, run, table and JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from server.bench.soak.runner import SoakPlan

DEFAULT_URL = "http://127.0.0.1:7860"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL,
                        help=f"server base URL (default {DEFAULT_URL}); for RSS and fd figures "
                        "the server must run on this machine")
    parser.add_argument("--api-key", help="sent as a Bearer token (default $VLSERVE_API_KEY)")
    parser.add_argument("--clients", type=_positive, default=64, help="default 64")
    parser.add_argument("--duration", type=float, default=300.0,
                        help="seconds of load (default 300)")
    parser.add_argument("--warmup", type=float,
                        help="seconds before RSS is taken as the baseline (default 20 %% of "
                        "the duration, 2 to 60 s)")
    parser.add_argument("--max-tokens", type=_positive, default=32,
                        help="per request, at most (default 32; streams twice that)")
    parser.add_argument("--images", type=_positive, default=24,
                        help="distinct pictures the clients send (default 24)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    parser.add_argument("--pid", type=int,
                        help="server process (default: the one listening on the URL's port)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")


def run(args: argparse.Namespace) -> int:
    from server.bench.soak.report import table, to_json
    from server.bench.soak.runner import SoakError, run_soak

    plan = SoakPlan(url=args.url, api_key=args.api_key or os.environ.get("VLSERVE_API_KEY"),
                    clients=args.clients, duration_s=args.duration, warmup_s=args.warmup,
                    max_tokens=args.max_tokens, timeout_s=args.timeout, images=args.images,
                    seed=args.seed, pid=args.pid)
    print(f"soak: {plan.clients} clients for {plan.duration_s:g} s against {plan.url} ...",
          flush=True)
    try:
        result = asyncio.run(run_soak(plan, report=lambda line: print(line, flush=True)))
    except SoakError as exc:
        print(f"vlserve bench soak: {exc}", file=sys.stderr)
        return 2
    print(table(result))
    data = to_json(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return 0 if data["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlserve bench soak", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value
