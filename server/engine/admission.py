"""The queue between request handlers and the slot loop, and what leaving it early means.

A request whose client has gone is taken out of the queue at the engine's next step, not
when a slot frees up: its handler gets a terminal event at once (so it returns and lets go
of the request body), its tokenized prompt is freed, and nothing counts it as running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from server.engine import mtmd
from server.engine.types import EngineEvent, ErrorEvent, GenerationRequest

logger = logging.getLogger("vlserve.engine")

# nginx's "client closed request": nobody reads it, but the handler must stop waiting and
# the request is logged and counted as what it was.
CLIENT_GONE = ErrorEvent(499, "the client closed the connection", code="client_closed_request")


class QueueFullError(RuntimeError):
    pass


class Sink(Protocol):
    def put(self, event: EngineEvent) -> None: ...


@dataclass
class Pending:
    request: GenerationRequest
    prompt: mtmd.TokenizedPrompt
    sink: Sink
    queued_at: float = field(default_factory=time.perf_counter)

    def answer(self, event: EngineEvent) -> None:
        """End it without running it: free the prompt, then tell the handler."""
        self.prompt.close()
        self.sink.put(event)

    def drop_cancelled(self) -> None:
        logger.info("request %s cancelled (client gone) after 0 tokens, while queued",
                    self.request.request_id)
        self.answer(CLIENT_GONE)


class Inbox:
    """Thread-safe FIFO that can also give up its cancelled entries."""

    def __init__(self) -> None:
        self._items: deque[Pending] = deque()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Pending, limit: int) -> None:
        with self._cond:
            if len(self._items) >= limit:
                raise QueueFullError("the request queue is full")
            self._items.append(item)
            self._cond.notify()

    def get(self, timeout: float) -> Pending | None:
        with self._cond:
            if not self._items and timeout > 0:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def take_cancelled(self) -> list[Pending]:
        """Remove and return the entries whose client has gone (a scan of at most
        max_queue + n_parallel entries per engine step)."""
        with self._cond:
            if not any(p.request.cancelled.is_set() for p in self._items):
                return []
            gone: list[Pending] = []
            kept: deque[Pending] = deque()
            for item in self._items:  # one look per entry: none can fall between the lists
                (gone if item.request.cancelled.is_set() else kept).append(item)
            self._items = kept
            return gone

    def take_all(self) -> list[Pending]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            return items
