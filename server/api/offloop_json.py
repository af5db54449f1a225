"""JSON request bodies parsed off the event loop once they are large.

FastAPI parses a body with `await request.json()` on the loop. Note what a worker thread
does not buy: the C decoder holds the GIL for the whole parse (measured beside a 1 ms
ticker thread: ~70 ms for a 45 MB string, ~130 ms for 200k small objects), so the loop
waits that long either way; the 45 MB stall test measured 105-146 ms parsed on the loop
and 59-137 ms here, within this machine's noise. What bounds such pauses is refusing
early: object counts before parsing (server/api/limits.py), text certainly over the
context before rendering (server/engine/prepare.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

OFF_LOOP_BYTES = 256 * 1024  # below this a parse takes well under a millisecond


class _OffLoopJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = await asyncio.to_thread(json.loads, body) \
                if len(body) > OFF_LOOP_BYTES else json.loads(body)
        return self._json


class OffLoopJSONRoute(APIRoute):
    """A route whose large JSON bodies are parsed in a worker thread (FastAPI's documented
    way to customise the request a route sees)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def off_loop_handler(request: Request) -> Response:
            return await handler(_OffLoopJSONRequest(request.scope, request.receive))

        return off_loop_handler
