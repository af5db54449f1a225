"""`vlserve batch INPUT.jsonl -o OUTPUT.jsonl`: one batch, run to the end, with progress.

Both ways run the same Batch API machinery as the server: `--url` uploads the file to a
running server and polls its batch; without it, the model is loaded in this process (the
same model options as `serve`) and the batch runs on an in-process app, no HTTP at all.
Successes go to OUTPUT, failures to OUTPUT.errors.jsonl, a summary to stderr at the end.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, Protocol, TextIO

from server.batches.job import TERMINAL

POLL_S = 0.25


class Backend(Protocol):
    async def submit(self, data: bytes, window: str) -> str: ...
    async def batch(self, batch_id: str) -> dict[str, Any]: ...
    async def content(self, file_id: str) -> bytes: ...


class Progress:
    """One line on stderr: done/total, failures, rate and ETA (redrawn on a terminal,
    printed every few seconds into a log file)."""

    def __init__(self, out: TextIO = sys.stderr, every_s: float = 5.0) -> None:
        self.out = out
        self.tty = out.isatty()
        self.every_s = every_s
        self.started = time.monotonic()
        self._last = 0.0

    def show(self, counts: dict[str, int], final: bool = False) -> None:
        now = time.monotonic()
        if not final and (not counts.get("total") or (
                not self.tty and now - self._last < self.every_s)):
            return  # nothing to show before validation counted the lines
        self._last = now
        self.out.write(("\r" if self.tty else "") + self.line(counts, now - self.started)
                       + ("\n" if final or not self.tty else ""))
        self.out.flush()

    @staticmethod
    def line(counts: dict[str, int], elapsed: float) -> str:
        total = counts.get("total", 0)
        done = counts.get("completed", 0) + counts.get("failed", 0)
        width = 24
        filled = width * done // total if total else 0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f"ETA {(total - done) / rate:.0f} s" if rate > 0 and done < total else \
            ("done" if total and done >= total else "ETA ?")
        return (f"batch [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                f"({counts.get('failed', 0)} failed) {rate:.1f} req/s {eta}")


async def run(backend: Backend, input_path: Path, output: Path, window: str = "24h",
              progress: Progress | None = None) -> int:
    """Run INPUT to the end; 0 when every line succeeded, 1 otherwise."""
    progress = progress or Progress()
    batch_id = await backend.submit(input_path.read_bytes(), window)
    while True:
        batch = await backend.batch(batch_id)
        progress.show(batch["request_counts"])
        if batch["status"] in TERMINAL:
            break
        await asyncio.sleep(POLL_S)
    progress.show(batch["request_counts"], final=True)
    errors_path = output.with_name(output.name.removesuffix(".jsonl") + ".errors.jsonl")
    output.write_bytes(await _file(backend, batch.get("output_file_id")))
    errors = await _file(backend, batch.get("error_file_id"))
    errors_path.unlink(missing_ok=True)
    if errors:
        errors_path.write_bytes(errors)
    return summarize(batch, errors, output, errors_path, sys.stderr)


async def _file(backend: Backend, file_id: str | None) -> bytes:
    return await backend.content(file_id) if file_id else b""


def summarize(batch: dict[str, Any], errors: bytes, output: Path, errors_path: Path,
              out: TextIO) -> int:
    counts = batch["request_counts"]
    if batch["status"] == "failed":
        for problem in (batch.get("errors") or {}).get("data", []):
            line = f" (line {problem['line']})" if problem.get("line") else ""
            print(f"batch failed{line}: {problem['message']}", file=out)
        return 1
    print(f"batch {batch['status']}: {counts['completed']} of {counts['total']} requests "
          f"succeeded, {counts['failed']} failed; answers in {output}", file=out)
    failures = [json.loads(line) for line in errors.splitlines() if line.strip()]
    if failures:
        print(f"failures in {errors_path}; the first ones:", file=out)
        for item in failures[:5]:
            print(f"  {item.get('custom_id')}: {_reason(item)}", file=out)
    return 0 if batch["status"] == "completed" and not failures else 1


def _reason(item: dict[str, Any]) -> str:
    if item.get("error"):
        return str(item["error"].get("message"))
    response = item.get("response") or {}
    body = response.get("body") or {}
    message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
    return f"HTTP {response.get('status_code')}: {message}"
