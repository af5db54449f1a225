"""Graceful shutdown, HTTP side: count requests in flight; once draining, refuse new ones.

While draining, /health answers 503 {"status": "draining"} (so load balancers and Docker
take the server out of rotation) and every other new request gets a 503 OpenAI error with
Retry-After, so clients retry elsewhere or later; requests already running are untouched.
`server.serving` starts the drain on SIGTERM and exits once `in_flight` reaches 0.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response
from server.logs import printable

logger = logging.getLogger("vlserve.drain")

# Liveness keeps answering while draining: a liveness probe that failed then would get the
# process killed in the middle of finishing its requests.
LIVE_PATHS = frozenset({"/livez"})


class Drain:
    """Shared between the middleware (counts, refuses) and the server loop (decides to exit)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.started_at: float | None = None  # time.monotonic() when draining began

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def start(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()

    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at


class DrainMiddleware:
    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining and scope["path"] not in LIVE_PATHS:
            # Connection: close makes uvicorn drop the keep-alive connection after this answer.
            headers = {"Retry-After": "5", "Connection": "close"}
            if scope["path"] == "/health":
                response = JSONResponse({"status": "draining"}, status_code=503, headers=headers)
            else:
                response = error_response(503, "the server is shutting down; retry shortly",
                                          code="server_shutting_down", headers=headers)
            await response(scope, receive, send)
            return
        # In flight from the first byte in to the last byte out (streams included).
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            # uvicorn cancels what is left once the drain timeout has passed. A request that
            # has no answer yet gets a proper 503 instead of uvicorn's plain-text 500; a
            # response already under way can only be cut.
            if started or not self.drain.draining:
                raise
            logger.warning("drain timeout: answering 503 to %s %s", scope["method"],
                           printable(scope["path"]))  # the path as sent: escaped
            response = error_response(503, "the server shut down before this request "
                                      "finished; retry it", code="server_shutting_down",
                                      headers={"Retry-After": "5", "Connection": "close"})
            await response(scope, receive, send)
        finally:
            self.drain.in_flight -= 1
