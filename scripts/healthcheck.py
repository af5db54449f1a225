#!/usr/bin/env python3
"""Health probe for Docker's HEALTHCHECK: exit 0 when GET /health answers 200, else 1.

/health is 200 only once the model is loaded and warmed up (503 while loading, draining
or failed). URL: the first argument, else http://127.0.0.1:$VLSERVE_PORT/health (7860).
Standard library only, so the runtime image needs no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    port = os.environ.get("VLSERVE_PORT") or "7860"
    url = argv[1] if len(argv) > 1 else f"http://127.0.0.1:{port}/health"
    # No proxies: a container's http_proxy must not intercept a loopback probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=4) as response:
            status = response.status
    except urllib.error.HTTPError as exc:  # 503: loading, draining or failed
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
