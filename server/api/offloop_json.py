"""JSON request bodies parsed off the event loop once they are large.

FastAPI parses a body with `await request.json()` on the loop: a 20 MB chat with base64
images holds every other stream's next token for ~50 ms, a 45 MB one for ~150 ms. The
decoder keeps the GIL, but in a worker thread the loop still gets the interpreter every
switch interval (5 ms) instead of waiting for the whole parse.
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
