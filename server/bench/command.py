"""`vlserve bench` arguments and the run: measure, print the table, write JSON and PNG."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from server.bench.payloads import ImageSpec
from server.bench.runner import BenchPlan

DEFAULT_URL = "http://127.0.0.1:7860"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL,
                        help=f"server base URL, with or without /api/v1 (default {DEFAULT_URL})")
    parser.add_argument("--api-key", help="sent as a Bearer token (default $VLSERVE_API_KEY)")
    parser.add_argument("-n", "--requests", type=_positive, default=10,
                        help="requests per scenario (default 10)")
    parser.add_argument("--concurrency", type=_levels, default=(1, 2, 4, 8),
                        help="concurrency levels for image requests (text ones on a "
                        "text-only model), e.g. 1,2,4,8 ('' skips)")
    parser.add_argument("--image-size", type=_size, default=(1920, 1080), metavar="WxH",
                        help="size of the synthetic JPEG (default 1920x1080)")
    parser.add_argument("--image", type=Path, help="use this picture instead (sent as JPEG)")
    parser.add_argument("--prompt", help="default: a question about the image (a sentence "
                        "about the sea on a text-only model)")
    parser.add_argument("--max-tokens", type=_positive, default=64)
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    parser.add_argument("--out", type=Path,
                        help="output directory (default bench-results/<UTC time>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def plan_from(args: argparse.Namespace) -> BenchPlan:
    return BenchPlan(
        url=args.url,
        api_key=args.api_key or os.environ.get("VLSERVE_API_KEY") or None,
        requests=args.requests,
        concurrency=args.concurrency,
        image=ImageSpec(size=args.image_size, path=args.image),
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        timeout_s=args.timeout,
    )


def run(args: argparse.Namespace) -> int:
    from server.bench.progress import Progress
    from server.bench.report import table, to_json
    from server.bench.runner import BenchError, run_bench
    from server.bench.verdict import judge

    if args.image is not None and not args.image.is_file():
        print(f"vlserve bench: image not found: {args.image}", file=sys.stderr)
        return 2
    plan = plan_from(args)
    out = args.out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    progress = Progress(sum(s.requests for s in plan.scenarios()), enabled=not args.no_progress)
    try:
        result = asyncio.run(run_bench(plan, progress))
    except BenchError as exc:
        print(f"vlserve bench: {exc}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    verdict = judge(result.scenarios, result.server)
    text = table(result, verdict)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.txt").write_text(text + "\n", encoding="utf-8")
    (out / "bench.json").write_text(json.dumps(to_json(result, verdict), indent=1) + "\n",
                                    encoding="utf-8")
    written = [out / "bench.txt", out / "bench.json"]
    try:
        from server.bench.chart import write_chart

        write_chart(result, verdict, out / "bench.png")
        written.append(out / "bench.png")
    except ImportError:
        print("vlserve bench: no chart: install matplotlib (pip install 'vlserve[bench]')",
              file=sys.stderr)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("expected integers like 1,2,4,8") from None
    if any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError("concurrency levels must be at least 1")
    return levels


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError("expected WIDTHxHEIGHT, e.g. 1920x1080") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError("width and height must be at least 1")
    return width, height
