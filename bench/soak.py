"""Soak test of a running server: many clients, a bounded time, nothing lost.

    .venv/bin/python -m bench.soak --url http://127.0.0.1:7860 --clients 64 --duration 300

The same as `vlserve bench soak` (server/bench/soak/): good, bad and abandoned requests
from every client; counts of 200 / 429 / expected 4xx / anything else (must be 0),
latency, the server's RSS after warm-up and its open fds before and after. Exit status 0
when every check passes, 1 when one fails, 2 when the server cannot be reached.
"""

from __future__ import annotations

import sys

from server.bench.soak.command import main

if __name__ == "__main__":
    sys.exit(main())
