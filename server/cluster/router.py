"""vllm-router's command line, as `vlserve cluster` runs it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from server.config import ConfigError

# The policies a vlserve cluster offers (vllm-router has more; these are the ones measured).
# consistent_hash keys a conversation by its X-Session-ID header (the whole body without one);
# cache_aware matches request text prefixes; power_of_two compares GET /get_load.
POLICIES = ("consistent_hash", "cache_aware", "power_of_two", "round_robin")
# Chosen by bench/cluster.py (README "Scaling out"): every turn 2-3 of a multi-turn image chat
# found its prefix on the replica it landed on.
DEFAULT_POLICY = "consistent_hash"

# Its defaults check workers every 60 s and drop one after 3 failures: a killed replica's
# sessions would get errors for minutes. Checked every second, dropped after two misses.
# Its circuit breaker (open after 10 failed requests) stays open 60 s by default: a
# restarted replica would get no traffic for a minute; 5 s, then it is tried again.
HEALTH_ARGS = ("--health-check-interval-secs", "1", "--health-check-timeout-secs", "2",
               "--health-failure-threshold", "2", "--health-success-threshold", "1",
               "--retry-max-retries", "3", "--retry-initial-backoff-ms", "100",
               "--retry-max-backoff-ms", "1000", "--cb-timeout-duration-secs", "5")


def router_binary() -> Path:
    """The vllm-router next to this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "vllm-router"
    if beside.is_file():
        return beside
    found = shutil.which("vllm-router")
    if found is None:
        raise ConfigError("vllm-router is not installed: pip install 'vlserve[cluster]' "
                          "(it pins vllm-router==0.1.17)")
    return Path(found)


def router_argv(*, host: str, port: int, workers: list[str], policy: str,
                prometheus_port: int, startup_timeout: float,
                extra: tuple[str, ...] = ()) -> list[str]:
    if policy not in POLICIES:
        raise ConfigError(f"unknown router policy {policy!r} (one of {', '.join(POLICIES)})")
    if policy == "power_of_two" and len(workers) < 2:
        raise ConfigError("the power_of_two policy needs at least 2 replicas")
    return [str(router_binary()), "--host", host, "--port", str(port),
            "--worker-urls", *workers, "--policy", policy, *HEALTH_ARGS,
            "--worker-startup-timeout-secs", str(int(startup_timeout)),
            "--worker-startup-check-interval", "1",
            # Its defaults (29000, and 80 for discovered pods) collide on a shared box; the
            # discovery port only matters with --service-discovery (deploy/kubernetes/).
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prometheus_port),
            "--service-discovery-port", "7860", *extra]
