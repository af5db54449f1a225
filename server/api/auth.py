"""Optional bearer-token auth, as a small pure-ASGI middleware.

Default deny: with keys configured every path needs one, except /health, /livez and
/get_load (probes carry no key), the playground page and its static files (a page holds no
data; every API call it makes carries the key its user types in), and /metrics when
`metrics_open`. So
/openapi.json, /docs, /redoc and any route added later are covered without anyone having to
remember them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import error_response
from server.api.internal import is_internal
from server.api.keyring import KeyRing

logger = logging.getLogger("vlserve.api")

# The router's and the orchestrator's probes carry no key: /health (readiness), /livez
# (liveness) and /get_load (a count for load-aware routing) answer without one.
OPEN_PATHS = frozenset({"/health", "/livez", "/get_load", "/", "/playground"})
OPEN_PREFIXES = ("/playground/static/",)
_IDENTITY = "vlserve.client"  # scope key: which key the request came with


def client_identity(scope: Scope) -> str:
    """Who sent the request, as far as the server can tell: a digest of its API key ("" with
    auth off). Uploads are kept apart by it, so one key's files are invisible to another."""
    return scope.get(_IDENTITY, "")


def set_identity(scope: Scope, client: str) -> None:
    """Run an in-process request (a batch line) as `client`, the batch's owner."""
    scope[_IDENTITY] = client


def is_protected(path: str, *, metrics_open: bool) -> bool:
    """Whether a request path needs a key (when keys are configured at all)."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return False
    return not (metrics_open and path == "/metrics")


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


class APIKeyMiddleware:
    """401 (OpenAI error JSON) for protected paths without one of the configured keys."""

    def __init__(self, app: ASGIApp, keys: KeyRing, *, metrics_open: bool = False,
                 on_reject: Callable[[str], None] | None = None) -> None:
        self.app = app
        self._keyring = keys  # read at each request: a rotated key file counts at once
        self._metrics_open = metrics_open
        self._on_reject = on_reject  # counts a 401 by reason (missing, invalid)
        self._log = RejectionLog()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self._keyring.keys \
                or not is_protected(scope["path"], metrics_open=self._metrics_open) \
                or is_internal(scope):  # a batch line: its identity was set by the server
            # Every method, OPTIONS included: a 405 with its Allow header would tell which
            # paths exist. CORS preflights (which carry no key by design) never get here:
            # the CORS middleware outside answers them for the configured origins.
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope["headers"])
        if token is not None and self._accepts(token):
            scope[_IDENTITY] = hashlib.sha256(token).hexdigest()[:32]  # never the key itself
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":  # none today; a future one must not slip through
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        message = ("missing API key: send it as 'Authorization: Bearer <key>'" if token is None
                   else "invalid API key")  # never echo the key, not even in part
        reason = "missing" if token is None else "invalid"
        if self._on_reject is not None:
            self._on_reject(reason)
        client = scope.get("client")
        self._log.rejected(reason, client[0] if client else "?", scope["path"])
        response = error_response(401, message, code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _accepts(self, token: bytes) -> bool:
        # Compare against every key, without stopping early: the time taken does not tell
        # which key (if any) matched.
        matched = False
        for key in self._keyring.keys:
            matched |= hmac.compare_digest(token, key)
        return matched


class RejectionLog:
    """One warning per `window_s` about 401s, with how many there were: a client still
    sending a rotated-out key shows in the log, and a flood of guesses does not flood it."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._since = -window_s  # monotonic start of the current window
        self._quiet = 0  # rejections not logged in it

    def rejected(self, reason: str, client: str, path: str) -> None:
        now = time.monotonic()
        if now - self._since < self.window_s:
            self._quiet += 1
            return
        more = f" ({self._quiet} more since the last such line)" \
            if self._quiet else ""
        logger.warning("401 %s API key from %s on %s%s", reason, client, path, more)
        self._since, self._quiet = now, 0

