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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from server.engine import mtmd
from server.engine.types import EngineEvent, ErrorEvent, GenerationRequest

if TYPE_CHECKING:
    from server.engine.jobs import Job, Slot

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
    job: Job | None = None  # a preempted job waiting to resume, with all it generated
    # The other choices of an `n > 1` request: admitted together, they share its prompt.
    siblings: list[tuple[GenerationRequest, Sink]] = field(default_factory=list)

    @property
    def n_slots(self) -> int:
        return 1 + len(self.siblings)

    def sinks(self) -> list[Sink]:
        return [self.sink, *(sink for _, sink in self.siblings)]

    def answer(self, event: EngineEvent) -> None:
        """End it without (re)running it: free the prompt and sampler, tell the handlers."""
        self.prompt.close()
        if self.job is not None:
            self.job.sampler.free()
        for sink in self.sinks():
            sink.put(event)

    def drop_cancelled(self) -> None:
        done = self.job.n_generated if self.job is not None else 0
        logger.info("request %s cancelled (client gone) after %d tokens, while queued",
                    self.request.request_id, done)
        self.answer(CLIENT_GONE)


class Inbox:
    """Thread-safe FIFO that can also give up its cancelled entries."""

    def __init__(self) -> None:
        self._items: deque[Pending] = deque()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Pending, limit: int) -> None:
        """Queue `item` unless `limit` entries of its priority or above already wait
        (batch lines waiting never make an interactive request's queue full)."""
        with self._cond:
            priority = item.request.priority
            if len(self._items) >= limit and sum(
                    1 for p in self._items if p.request.priority >= priority) >= limit:
                raise QueueFullError("the request queue is full")
            self._items.append(item)
            self._cond.notify()

    def put_front(self, item: Pending) -> None:
        """Requeue a preempted job ahead of everything (past the limit: it was admitted)."""
        with self._cond:
            self._items.appendleft(item)
            self._cond.notify()

    def get(self, timeout: float, accept: Callable[[Pending], bool] | None = None
            ) -> Pending | None:
        """The head, if there is one (waiting up to `timeout`) and `accept` takes it; a head
        that is not accepted stays first, so nothing overtakes it. The head is the oldest
        entry of the highest priority waiting (batch lines never pass interactive ones)."""
        with self._cond:
            if not self._items and timeout > 0:
                self._cond.wait(timeout)
            head = self._head()
            if head is None or (accept is not None and not accept(head)):
                return None
            self._items.remove(head)
            return head

    def head(self) -> Pending | None:
        """What `get` would take next, left in place."""
        with self._cond:
            return self._head()

    def _head(self) -> Pending | None:
        if not self._items:
            return None
        first = self._items[0]
        top = max(p.request.priority for p in self._items)
        if first.request.priority == top:  # the usual case: one class, FIFO
            return first
        return next(p for p in self._items if p.request.priority == top)

    def take_cancelled(self) -> list[Pending]:
        """Remove and return the entries whose client has gone (a scan of at most
        max_queue + n_parallel entries per engine step)."""
        if not self._items:  # every step asks: skip the lock when nothing waits
            return []
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


def outranked(slots: list[Slot], head: Pending | None, fits: Callable[[Pending], bool]
              ) -> Slot | None:
    """The slot to preempt so that `head` (a higher-priority request) can start now: the
    newest job of the lowest priority running below it, when no slot is free or `head`
    does not fit the KV cache beside the running jobs. None when nothing ranks below it."""
    if head is None:
        return None
    lower = [s for s in slots if s.job is not None
             and s.job.request.priority < head.request.priority]
    if not lower or (any(s.job is None for s in slots) and fits(head)):
        return None
    return max(lower, key=lambda s: (-s.job.request.priority, s.job.order))  # type: ignore[union-attr]
