"""The bench's outputs in words: the terminal table and verdict, and the JSON file."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from server.bench.results import ScenarioResult, Spread
from server.bench.runner import BenchRun
from server.bench.verdict import CRITICAL, INFO, Verdict

# (label, key of the per-request value); all in ms, shown as median / p95.
TIME_ROWS = (
    ("queue", "queue"),
    ("image_decode", "image_decode"),
    ("image_resize", "image_resize"),
    ("image_encode", "image_encode"),
    ("prompt_eval", "prompt_eval"),
    ("generation", "generation"),
    ("TTFT (server)", "first_token"),
    ("total (server)", "total"),
    ("TTFT (client)", "client_ttft"),
    ("total (client)", "client_total"),
)


def table(run: BenchRun, verdict: Verdict) -> str:
    """Scenarios as columns, measures as rows; time cells are `median / p95` in ms."""
    scenarios = run.scenarios
    rows: list[list[str]] = [["", *(s.name for s in scenarios)]]
    rows.append(["requests ok/failed", *(f"{len(s.ok)}/{s.errors}" for s in scenarios)])
    for label, key in TIME_ROWS:
        rows.append([label, *(_time_cell(s, key) for s in scenarios)])
    rows.append(["tok/s per request", *(_plain_cell(s.spread("tokens_per_second"))
                                        for s in scenarios)])
    rows.append(["throughput req/s", *(f"{s.requests_per_s:.2f}" for s in scenarios)])
    rows.append(["throughput tok/s", *(f"{s.tokens_per_s:.1f}" for s in scenarios)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [_header(run), ""]
    for number, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                          strict=True)]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("-" * len(lines[-1]))
    lines.append("times in ms as median / p95; '-' where the stage does not apply")
    lines += ["", *verdict_lines(verdict)]
    return "\n".join(lines)


def verdict_lines(verdict: Verdict) -> list[str]:
    lines = [f"Bottleneck: {verdict.bottleneck.message}"]
    for finding in verdict.findings:
        mark = {CRITICAL: "Failed", INFO: "Note"}.get(finding.severity, "Also")
        lines.append(f"{mark}: {finding.message}")
    return lines


def to_json(run: BenchRun, verdict: Verdict) -> dict[str, Any]:
    plan = asdict(run.plan)
    plan.pop("api_key")  # never written to disk
    plan["image"] = {"size": list(run.plan.image.size),
                     "path": str(run.plan.image.path) if run.plan.image.path else None,
                     "jpeg_bytes": run.image_bytes}
    return {
        "vlserve_bench": 1,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(run.started_at)),
        "duration_s": round(run.duration_s, 2),
        "server": asdict(run.server),
        "plan": plan,
        "verdict": verdict.to_dict(),
        "scenarios": [s.to_dict() for s in run.scenarios],
    }


def _header(run: BenchRun) -> str:
    plan = run.plan
    images = (f"{plan.image.describe()} ({run.image_bytes / 1024:.0f} kB)"
              if run.image_bytes else "text only")
    return (f"vlserve bench: {run.server.model} at {run.server.url}, {images}, "
            f"max_tokens {plan.max_tokens}, {run.duration_s:.0f} s")


def _time_cell(scenario: ScenarioResult, key: str) -> str:
    if key.startswith("image_") and scenario.kind == "text":
        return "-"
    spread = scenario.spread(key)
    if spread is None:
        return "-"
    return f"{_num(spread.p50)} / {_num(spread.p95)}"


def _plain_cell(spread: Spread | None) -> str:
    return "-" if spread is None else f"{_num(spread.p50)} / {_num(spread.p95)}"


def _num(value: float) -> str:
    """Three significant figures at most, no exponent: 0.42, 4.2, 42.0, 420, 4200."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
