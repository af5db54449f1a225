"""The `X-Vlserve-Replica` response header: which replica behind a router answered.

Set by `replica_id` (`vlserve cluster` gives each replica its own); off when unset. It lets
an operator (and the cluster tests) see that a session stays where its KV prefix is.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REPLICA_HEADER = "X-Vlserve-Replica"


class ReplicaHeader:
    def __init__(self, app: ASGIApp, replica_id: str) -> None:
        self.app = app
        self._header = (REPLICA_HEADER.lower().encode(), replica_id.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self._header]
            await send(message)

        await self.app(scope, receive, send_with_header)
