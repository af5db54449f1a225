"""One response at a time per conversation, as OpenAI's: a second one while the first runs
is a 400 `conversation_locked` (it would answer without the first's turn, and both would
append to the same history). In this process with memory://; among every replica sharing
a Redis store with redis:// (server.api.conversation_locks_shared)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from server.api.errors import APIError
from server.store import StateBackend


class Lease(Protocol):
    """A held conversation; `release` is idempotent (the stream's end, the request's end
    and a background task may each call it) and never waits, so a cancelled task's
    `finally` can call it; `aclose` releases and waits until the hold is given up. A lease
    that `lapses` stops counting after the locks' lapse_s: a stream's, until its generator
    starts (a response whose stream never starts may never give it back); `pin` makes it
    hold until released."""

    conversation_id: str

    def pin(self) -> None: ...

    def touch(self) -> None:
        """Count the lapse from now (a stream handed over, after its time in the queue)."""
        ...

    def release(self) -> None: ...

    async def aclose(self) -> None: ...


class Locks(Protocol):
    async def acquire(self, conversation_id: str, *, lapses: bool = False) -> Lease:
        """Hold the conversation; APIError 400 conversation_locked while another response
        holds it (StateUnavailable: the shared store is out of reach)."""
        ...


def locked() -> APIError:
    return APIError(400, "conversation: another response is running on this conversation; "
                    "retry once it has finished", param="conversation",
                    code="conversation_locked")


def open_conversation_locks(backend: StateBackend, lapse_s: float) -> Locks:
    leases = backend.leases("conversation_locks")
    if leases is None:
        return ConversationLocks(lapse_s)
    from server.api.conversation_locks_shared import SharedConversationLocks

    return SharedConversationLocks(leases, lapse_s)


class ConversationLease:
    """A lease on this process's locks (see Lease)."""

    def __init__(self, locks: ConversationLocks, conversation_id: str, lapses: bool) -> None:
        self._locks = locks
        self.conversation_id = conversation_id
        self.lapses = lapses
        self.released = False

    def pin(self) -> None:
        self.lapses = False

    def touch(self) -> None:
        self._locks.touch(self)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._locks.release(self)

    async def aclose(self) -> None:
        self.release()


class ConversationLocks:
    """The conversations held in this process."""

    def __init__(self, lapse_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.lapse_s = lapse_s  # a lapsing lease never given back stops counting after this
        self._clock = clock
        self._held: dict[str, tuple[ConversationLease, float]] = {}

    async def acquire(self, conversation_id: str, *, lapses: bool = False
                      ) -> ConversationLease:
        held = self._held.get(conversation_id)
        now = self._clock()
        if held is not None and not (held[0].lapses and now - held[1] >= self.lapse_s):
            raise locked()
        lease = ConversationLease(self, conversation_id, lapses)
        self._held[conversation_id] = (lease, now)
        return lease

    def touch(self, lease: ConversationLease) -> None:
        held = self._held.get(lease.conversation_id)
        if held is not None and held[0] is lease:
            self._held[lease.conversation_id] = (lease, self._clock())

    def release(self, lease: ConversationLease) -> None:
        held = self._held.get(lease.conversation_id)
        if held is not None and held[0] is lease:  # not a lapsed lease's successor
            del self._held[lease.conversation_id]

    def __len__(self) -> int:
        return len(self._held)
