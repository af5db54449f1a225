"""The router's worker list, kept in step with the replicas' lives.

vllm-router finds a dead worker by itself only through failed requests and health checks
(every second, two misses), and meanwhile answers the requests it sends there with 500s.
The cluster sees a replica die the moment it exits, so it takes the replica out of the
router's list at once (`POST /remove_worker?url=`, vllm-router 0.1.17) and puts the
replacement back (`POST /add_worker?url=`) once that answers `/health` 200: no request is
routed to a dead or loading replica in between.
"""

from __future__ import annotations

import logging
import time

import httpx

logger = logging.getLogger("vlserve.cluster")

# How often a removed replica's /health is asked while its replacement loads.
CHECK_EVERY_S = 0.5
# /add_worker answers once the router's own health check of the worker passed; the replica
# answered /health 200 just before, so this is a bound, not a wait.
ADD_TIMEOUT_S = 10.0


class RouterWorkers:
    """Removes dead replicas from the router and adds them back when ready. Called from the
    cluster's supervising thread only; every call is bounded by a short timeout."""

    def __init__(self, router_url: str, client: httpx.Client | None = None) -> None:
        self.router_url = router_url.rstrip("/")
        self.client = client or httpx.Client(timeout=2.0)
        self.removed: dict[str, float] = {}  # worker URL -> when to check its health next

    def remove(self, url: str) -> bool:
        """Take `url` out of the router's list; False (and logged) when the router did not
        answer: its health checks will then drop the replica within seconds anyway."""
        if url in self.removed:
            return True
        if self._admin("remove_worker", url, timeout=2.0):
            self.removed[url] = 0.0
            return True
        return False

    def restore_ready(self) -> list[str]:
        """Add back every removed replica that answers /health 200 now; the URLs added."""
        added = []
        now = time.monotonic()
        for url, next_check in list(self.removed.items()):
            if now < next_check:
                continue
            self.removed[url] = now + CHECK_EVERY_S
            if self._healthy(url) and self._admin("add_worker", url, timeout=ADD_TIMEOUT_S):
                del self.removed[url]
                added.append(url)
        return added

    def forget(self) -> None:
        """The router restarted: it lists every replica again and checks them itself."""
        self.removed.clear()

    def close(self) -> None:
        self.client.close()

    def _healthy(self, url: str) -> bool:
        try:
            return self.client.get(f"{url}/health", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _admin(self, action: str, url: str, *, timeout: float) -> bool:
        try:
            answer = self.client.post(f"{self.router_url}/{action}", params={"url": url},
                                      timeout=timeout)
        except httpx.HTTPError as exc:
            logger.warning("router %s %s failed: %s", action, url, exc)
            return False
        if answer.status_code != 200:
            logger.warning("router %s %s: HTTP %d %s", action, url, answer.status_code,
                           answer.text[:200])
            return False
        return True
