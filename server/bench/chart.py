"""The bench chart (PNG): where the time goes per scenario, and throughput vs concurrency."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from server.bench.runner import BenchRun
from server.bench.verdict import Verdict
from server.timings import SEQUENTIAL_STAGES

if TYPE_CHECKING:  # matplotlib is an optional extra
    from matplotlib.axes import Axes

STAGE_COLOURS = {
    "queue": "#9e9e9e",
    "image_decode": "#f4a261",
    "image_resize": "#e9c46a",
    "image_encode": "#e76f51",
    "prompt_eval": "#2a9d8f",
    "generation": "#264653",
}


def write_chart(run: BenchRun, verdict: Verdict, path: Path) -> None:
    """Needs matplotlib (the `bench` extra); drawn off-screen, so no display is required."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (stages_ax, rate_ax) = plt.subplots(
        1, 2, figsize=(14, 6.5), gridspec_kw={"width_ratios": [3, 2]})
    fig.subplots_adjust(left=0.07, right=0.93, top=0.88, bottom=0.26, wspace=0.3)
    fig.suptitle(f"vlserve bench: {run.server.model} at {run.server.url}", fontsize=13)
    _stage_bars(stages_ax, run)
    _throughput(rate_ax, run)
    text = "\n".join(textwrap.wrap(f"Bottleneck: {verdict.bottleneck.message}", 150))
    fig.text(0.07, 0.04, text, ha="left", va="bottom", fontsize=10, weight="bold")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stage_bars(ax: Axes, run: BenchRun) -> None:
    scenarios = run.scenarios[::-1]  # barh draws bottom-up; keep the table's order top-down
    names = [s.name for s in scenarios]
    left = [0.0] * len(scenarios)
    for stage in SEQUENTIAL_STAGES:
        widths = [s.mean(stage) for s in scenarios]
        ax.barh(names, widths, left=left, color=STAGE_COLOURS[stage], label=stage)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for name, end in zip(names, left, strict=True):
        ax.annotate(f" {end:.0f} ms", (end, name), va="center", fontsize=9)
    ttft = [s.mean("first_token") for s in scenarios]
    ax.scatter(ttft, names, marker="D", color="black", zorder=3, label="TTFT (server)")
    ax.set_xlim(right=max(left, default=1) * 1.12 or 1)
    ax.set_xlabel("ms per request (mean of each stage)")
    ax.set_title("Where a request's time goes")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=7, fontsize=8,
              frameon=False, handlelength=1.2, columnspacing=1.0)
    ax.grid(axis="x", alpha=0.3)


def _throughput(ax: Axes, run: BenchRun) -> None:
    levels = sorted((s for s in run.scenarios if s.name.startswith("c=")),
                    key=lambda s: s.concurrency)
    ax.set_title("Throughput vs concurrency (image requests)")
    if not levels:
        ax.text(0.5, 0.5, "no concurrency levels run", ha="center")
        return
    xs = [s.concurrency for s in levels]
    requests = [s.requests_per_s for s in levels]
    tokens = [s.tokens_per_s for s in levels]
    ax.plot(xs, requests, "o-", color="#e76f51", label="requests/s")
    for x, y in zip(xs, requests, strict=True):
        ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=9, color="#e76f51")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("requests/s", color="#e76f51")
    ax.set_ylim(bottom=0, top=max(requests) * 1.25 or 1)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(xs, tokens, "s--", color="#264653", label="generated tokens/s")
    twin.set_ylabel("generated tokens/s", color="#264653")
    twin.set_ylim(bottom=0, top=max(tokens) * 1.25 or 1)
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines],
              loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8,
              frameon=False)
