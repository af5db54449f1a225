"""What a bench run measured: samples per scenario and their medians, p95s and rates."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from server.timings import SEQUENTIAL_STAGES

# Server-side stages (from the response's `timings`), then what the client saw.
SERVER_KEYS = (*SEQUENTIAL_STAGES, "first_token", "total")
CLIENT_KEYS = ("client_ttft", "client_total")


@dataclass(frozen=True)
class Sample:
    """One request. `timings` is the server's `timings` object (empty if it failed)."""

    ok: bool
    status: int  # HTTP status; 0 when no response arrived
    client_total_ms: float
    client_ttft_ms: float | None = None  # until the first SSE event (sent after token one)
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def value(self, key: str) -> float | None:
        if key == "client_ttft":
            return self.client_ttft_ms
        if key == "client_total":
            return self.client_total_ms
        value = self.timings.get(key)
        return None if value is None else float(value)


@dataclass(frozen=True)
class Spread:
    p50: float
    p95: float
    mean: float


@dataclass
class ScenarioResult:
    name: str  # "text", "image", "c=4", ...
    kind: str  # "text" or "image"
    concurrency: int
    wall_s: float
    samples: list[Sample]

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    @property
    def errors(self) -> int:
        return len(self.samples) - len(self.ok)

    @property
    def requests_per_s(self) -> float:
        return len(self.ok) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second across all requests of the scenario."""
        tokens = sum(s.timings.get("completion_tokens", 0) for s in self.ok)
        return tokens / self.wall_s if self.wall_s > 0 else 0.0

    def spread(self, key: str) -> Spread | None:
        values = [v for s in self.ok if (v := s.value(key)) is not None]
        if not values:
            return None
        return Spread(percentile(values, 50), percentile(values, 95), sum(values) / len(values))

    def mean(self, key: str) -> float:
        spread = self.spread(key)
        return spread.mean if spread else 0.0

    def median(self, key: str) -> float:
        spread = self.spread(key)
        return spread.p50 if spread else 0.0

    def summary(self) -> dict[str, Any]:
        keys = (*SERVER_KEYS, *CLIENT_KEYS, "tokens_per_second", "completion_tokens")
        return {
            "requests": len(self.samples),
            "ok": len(self.ok),
            "errors": self.errors,
            "wall_s": round(self.wall_s, 3),
            "requests_per_s": round(self.requests_per_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "per_request": {k: _rounded(s) for k in keys if (s := self.spread(k)) is not None},
        }

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "concurrency": self.concurrency,
                "wall_s": self.wall_s, "summary": self.summary(),
                "samples": [asdict(s) for s in self.samples]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScenarioResult:
        return cls(name=data["name"], kind=data["kind"], concurrency=data["concurrency"],
                   wall_s=data["wall_s"],
                   samples=[Sample(**s) for s in data["samples"]])


@dataclass(frozen=True)
class ServerInfo:
    """The served model and the `meta` of GET /models (where layers and projector run)."""

    url: str
    model: str
    meta: dict[str, Any] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _rounded(spread: Spread) -> dict[str, float]:
    return {k: round(v, 3) for k, v in asdict(spread).items()}
