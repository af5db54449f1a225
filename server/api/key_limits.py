"""`max_requests_per_key`: how many generation requests (chat completions, completions,
responses: POSTs) one API key may have in flight at once, from arrival to the last byte
of the answer. Past it the request is a 429 at once, so one tenant's burst cannot take
every slot and the whole queue and leave the other keys only 429s. Without keys all
clients are one tenant, and the limit is the server's. Batch lines (run by the server as
their owner) and background runs (bounded by `background_max_runs_per_key`) do not count.
"""

from __future__ import annotations

from collections import Counter

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.auth import client_identity
from server.api.errors import error_response
from server.api.internal import is_internal
from server.api.paths import route_spelling


class KeyConcurrency:
    """Pure ASGI (streams stay streams): counts each key's requests while they run."""

    def __init__(self, app: ASGIApp, limit: int | None, paths: frozenset[str]) -> None:
        self.app = app
        self.limit = limit
        self.paths = paths
        self.in_flight: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.limit is None or scope["type"] != "http" or scope["method"] != "POST"
                or route_spelling(scope["path"]) not in self.paths or is_internal(scope)):
            await self.app(scope, receive, send)
            return
        client = client_identity(scope)
        if self.in_flight[client] >= self.limit:
            response = error_response(
                429, f"this API key has {self.limit} requests in flight, as many as it may "
                "at once: retry when one has finished", code="too_many_requests_per_key",
                headers={"Retry-After": "1"})
            await response(scope, receive, send)
            return
        self.in_flight[client] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[client] -= 1
            if not self.in_flight[client]:
                del self.in_flight[client]  # no entry left behind per key ever seen
