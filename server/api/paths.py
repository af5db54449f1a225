"""A path is a route only when spelled exactly: control characters are a 404.

Starlette's route patterns end in `$`, which in Python also matches before a final newline,
so `/api/v1/chat/completions%0A` was served as the chat route, unseen by the request log
and the metrics (they compare paths exactly). Nothing legitimate puts control characters
in a path, so any path holding one is answered like any other unknown path, before routing.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import error_response


def route_spelling(path: str) -> str:
    """`path` without its unprintable characters: the route a request was aimed at (the
    request log and the metrics count `/chat/completions%0A` as a chat request: a 404)."""
    if path.isprintable():
        return path
    return "".join(char for char in path if char.isprintable())


class ExactPaths:
    """404 (as Starlette answers an unknown path) for paths with unprintable characters."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not scope["path"].isprintable():
            if scope["type"] == "websocket":
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1008})
                return
            await error_response(404, "Not Found")(scope, receive, send)
            return
        await self.app(scope, receive, send)
