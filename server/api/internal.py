"""Requests the server makes to itself (batch lines): who they run as, and at what priority.

The markers live in the ASGI scope, which only the server itself builds: no header or body
a client sends can set them.
"""

from __future__ import annotations

from starlette.types import Scope

from server.engine.types import INTERACTIVE_PRIORITY

INTERNAL_KEY = "vlserve.internal"  # True: made in-process, already authenticated
PRIORITY_KEY = "vlserve.priority"


def is_internal(scope: Scope) -> bool:
    return scope.get(INTERNAL_KEY) is True


def request_priority(scope: Scope) -> int:
    """The engine priority of the request: interactive unless the server itself set another."""
    priority = scope.get(PRIORITY_KEY, INTERACTIVE_PRIORITY)
    return priority if is_internal(scope) and isinstance(priority, int) else INTERACTIVE_PRIORITY
