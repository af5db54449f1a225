"""Requests the server makes to itself (batch lines): who they run as, at what priority,
and the uploaded images their batch keeps.

The markers live in the ASGI scope, which only the server itself builds: no header or body
a client sends can set them. The images travel in a context variable set around the
in-process call (server/batches/call.py), so they reach the message resolver without
every layer in between passing them on.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar

from starlette.types import Scope

from server.engine.types import INTERACTIVE_PRIORITY
from server.uploads import StoredFile

INTERNAL_KEY = "vlserve.internal"  # True: made in-process, already authenticated
PRIORITY_KEY = "vlserve.priority"


def is_internal(scope: Scope) -> bool:
    return scope.get(INTERNAL_KEY) is True


def request_priority(scope: Scope) -> int:
    """The engine priority of the request: interactive unless the server itself set another."""
    priority = scope.get(PRIORITY_KEY, INTERACTIVE_PRIORITY)
    return priority if is_internal(scope) and isinstance(priority, int) else INTERACTIVE_PRIORITY


# file id → the upload as it was when the batch was created (its owner's only).
BATCH_IMAGES: ContextVar[Mapping[str, StoredFile] | None] = ContextVar(
    "vlserve_batch_images", default=None)


def batch_image(file_id: str) -> StoredFile | None:
    """The image a running batch line names by file id, if its batch keeps one: the upload
    itself may have expired, been deleted, or been lost with a restart since."""
    images = BATCH_IMAGES.get()
    return images.get(file_id) if images else None
