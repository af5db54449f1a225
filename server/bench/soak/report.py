"""A soak run judged: counts per verdict, latency, RSS growth after warm-up, fds, and the
checks that make it pass or fail."""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.bench.soak.client import VERDICTS, Outcome
from server.bench.soak.runner import SoakRun

MAX_RSS_GROWTH = 0.05  # after warm-up
FD_SLACK = 2  # a lazily opened descriptor or two (thread-pool eventfd, ...) is not a leak


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def rss_points(run: SoakRun) -> dict[str, float] | None:
    """RSS (bytes) at the end of warm-up, midway through the rest, and at the end; growth
    leaves out what the server's bounded caches gained meanwhile (they stop at their
    configured size: filling them is not a leak)."""
    if not run.rss:
        return None
    warm = run.plan.warmup

    def nearest(t: float) -> int:
        return min(range(len(run.rss)), key=lambda i: abs(run.rss[i][0] - t))

    first = nearest(warm)
    start, end = float(run.rss[first][1]), float(run.rss[-1][1])
    cached = (run.cached[-1] - run.cached[first]) if len(run.cached) == len(run.rss) else 0
    return {"start": start, "middle": float(run.rss[nearest(warm + (run.load_s - warm) / 2)][1]),
            "end": end, "max": float(max(rss for _, rss in run.rss)),
            "bounded_cache_growth": float(cached), "growth": (end - start - cached) / start}


def checks(run: SoakRun) -> list[Check]:
    counts = verdict_counts(run.outcomes)
    out = [Check("nothing else", counts["other"] == 0,
                 f"{counts['other']} answers were neither 200, 429 with Retry-After, the "
                 "expected 4xx nor a planned hang-up"),
           Check("served", counts["ok"] > 0, f"{counts['ok']} requests served"),
           Check("idle after", run.idle_after, "no slot busy and nothing queued once the "
                 "clients were gone" if run.idle_after else "slots still busy after 30 s"),
           Check("still serving", run.final_status == 200,
                 f"a chat after the run answered {run.final_status}")]
    rss = rss_points(run)
    if rss is not None:
        out.append(Check("RSS growth", rss["growth"] < MAX_RSS_GROWTH,
                         f"{rss['growth'] * 100:+.1f} % after warm-up (limit "
                         f"{MAX_RSS_GROWTH * 100:.0f} %; bounded caches' "
                         f"{rss['bounded_cache_growth'] / 2**20:+.1f} MiB left out)"))
    if run.fds_before is not None and run.fds_after is not None:
        out.append(Check("open fds", run.fds_after <= run.fds_before + FD_SLACK,
                         f"{run.fds_before} before, {run.fds_after} after"))
    if run.server_chats is not None:
        sent = sum(1 for o in run.outcomes if o.chat)
        out.append(Check("server counted", run.server_chats == sent,
                         f"the server logged {run.server_chats} chat requests, the clients "
                         f"sent {sent}"))
    return out


def verdict_counts(outcomes: list[Outcome]) -> dict[str, int]:
    counts = dict.fromkeys(VERDICTS, 0)
    for outcome in outcomes:
        counts[outcome.verdict] += 1
    return counts


def to_json(run: SoakRun) -> dict[str, object]:
    counts = verdict_counts(run.outcomes)
    ok = [o for o in run.outcomes if o.verdict == "ok"]
    kinds = sorted({o.kind for o in run.outcomes})
    return {
        "url": run.plan.url, "clients": run.plan.clients, "duration_s": run.plan.duration_s,
        "warmup_s": run.plan.warmup, "load_s": round(run.load_s, 2), "pid": run.pid,
        "sent": len(run.outcomes), "counts": counts,
        "by_kind": {k: verdict_counts([o for o in run.outcomes if o.kind == k])
                    for k in kinds},
        "latency_ms": {"p50": _ms(percentile([o.latency_s for o in ok], 50)),
                       "p99": _ms(percentile([o.latency_s for o in ok], 99)),
                       "by_kind": {k: {"p50": _ms(percentile(lat, 50)),
                                       "p99": _ms(percentile(lat, 99))}
                                   for k in kinds
                                   if (lat := [o.latency_s for o in ok if o.kind == k])}},
        "rss_bytes": rss_points(run), "fds": {"before": run.fds_before,
                                              "after": run.fds_after},
        "server_chats": run.server_chats, "client_chats": sum(o.chat for o in run.outcomes),
        "others": [{"kind": o.kind, "status": o.status, "detail": o.detail}
                   for o in run.outcomes if o.verdict == "other"][:50],
        "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail}
                   for c in checks(run)],
        "passed": all(c.passed for c in checks(run)), "notes": run.notes,
    }


def table(run: SoakRun) -> str:
    data = to_json(run)
    counts: dict[str, int] = data["counts"]  # type: ignore[assignment]
    latency: dict = data["latency_ms"]  # type: ignore[assignment]
    lines = [f"soak: {run.plan.clients} clients x {run.plan.duration_s:g} s (warm-up "
             f"{run.plan.warmup:g} s) against {run.plan.url}, server pid {run.pid}",
             f"  requests sent       {data['sent']:>8}   ({data['sent'] / run.load_s:.1f}/s)"
             if run.load_s else f"  requests sent       {data['sent']:>8}",
             f"  200                 {counts['ok']:>8}",
             f"  429 + Retry-After   {counts['429']:>8}",
             f"  4xx for bad ones    {counts['bad_4xx']:>8}",
             f"  abandoned streams   {counts['abandoned']:>8}",
             f"  anything else       {counts['other']:>8}   (must be 0)",
             f"  latency of 200s     p50 {_fmt(latency['p50'])} ms, p99 {_fmt(latency['p99'])} ms"]
    for kind, lat in latency["by_kind"].items():
        lines.append(f"    {kind:<16}  p50 {_fmt(lat['p50']):>8} ms, p99 {_fmt(lat['p99']):>8} ms")
    rss = rss_points(run)
    if rss is not None:
        lines.append("  server RSS          " + ", ".join(
            f"{name} {rss[name] / 2**20:.1f} MiB" for name in ("start", "middle", "end", "max"))
            + f"  ({rss['growth'] * 100:+.2f} % after warm-up)")
    if run.fds_before is not None:
        lines.append(f"  open fds            {run.fds_before} before, {run.fds_after} after")
    if run.server_chats is not None:
        lines.append(f"  chat requests       server counted {run.server_chats}, clients sent "
                     f"{data['client_chats']}")
    for other in data["others"][:10]:  # type: ignore[index]
        lines.append(f"  ! {other['kind']}: {other['detail'] or other['status']}")
    lines += [f"  {'ok ' if c.passed else 'FAIL'} {c.name}: {c.detail}" for c in checks(run)]
    lines += [f"  note: {note}" for note in run.notes]
    lines.append("PASS" if data["passed"] else "FAIL")
    return "\n".join(lines)


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 1)


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f}"
