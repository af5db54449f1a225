"""The API's other calls (files, batches, stored responses, conversations, models, ...):
counted and timed by route, and logged when they change something or fail.

Generation requests have their own line and metrics (server.api.observe); these are the
calls around them, which an operator otherwise could not see: a client polling a batch
thousands of times, uploads failing with 507, deletes. The route is the matched template
(`/files/{file_id}`, the same under /v1 and /api/v1), never the raw path, so the metrics'
label set stays bounded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.auth import client_identity
from server.api.paths import route_spelling
from server.api.routes import RouteInfo, route_table
from server.logs import REQUEST_LOGGER
from server.metrics import Metrics

request_log = logging.getLogger(REQUEST_LOGGER)

UNMATCHED = "unmatched"  # a path no route serves (a 404): one label for all of them
# Reads that only look: logged when they fail, counted always (a poll loop is no news).
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
_METHODS = _READS | {"POST", "PUT", "PATCH", "DELETE"}


class ApiCallObserver:
    """Pure ASGI, beside RequestObserver: the calls under `prefixes` it does not take."""

    def __init__(self, app: ASGIApp, metrics: Metrics, prefixes: tuple[str, ...],
                 generation_paths: frozenset[str], routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the app's, to name what routing never reached
        self._table: list[RouteInfo] = []
        self.prefixes = prefixes
        self.generation_paths = generation_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        # What RequestObserver takes (any method on a generation path but GET and HEAD,
        # which list stored completions) is its to count.
        if scope["type"] != "http" or not path.startswith(self.prefixes) or (
                scope["method"] not in ("GET", "HEAD")
                and route_spelling(path) in self.generation_paths):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what an exception before the response's start leaves

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self._observe(scope, status, time.perf_counter() - started)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        # Routing sets scope["route"]; a request answered before it (a body over
        # max_request_bytes, JSON nested too deep) is matched here, for its label.
        route = getattr(scope.get("route"), "path", None)
        if route is None:
            self._table = self._table or route_table(self.routes)  # every route exists now
            route = template(self._table, scope["path"], scope["method"], self.prefixes)
        route = route or UNMATCHED
        # Any token is a method to the HTTP parser: one label for the unknown ones, or a
        # client could grow the metric without bound.
        method = scope["method"] if scope["method"] in _METHODS else "other"
        self.metrics.observe_api_call(route, method, status, seconds)
        if method in _READS and status < 400:
            return
        client = scope.get("client")
        fields: dict[str, object] = {
            "event": "api_call", "method": method, "route": route, "status": status,
            "duration_ms": round(seconds * 1000, 1), "client": client[0] if client else None,
            "key": client_identity(scope)[:12] or None}
        request_log.info("api_call %s %s %d", method, route, status,
                         extra={"json_fields": fields})


def template(table: list[RouteInfo], path: str, method: str, prefixes: tuple[str, ...]
             ) -> str | None:
    """The template of the route `path` would reach (one serving `method` first), without
    its API prefix, as routing names it; None when no route serves the path."""
    matched = [info for info in table if info.regex.match(path)]
    best = next((i for i in matched if method in i.methods), matched[0] if matched else None)
    if best is None:
        return None
    prefix = next((p for p in prefixes if best.path.startswith(p + "/")), "")
    return best.path[len(prefix):]
