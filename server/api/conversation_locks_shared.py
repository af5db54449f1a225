"""The conversation lock among the replicas sharing a Redis store (state_url): a held
conversation is one key (server.store.redis_leases) with its holder's random token and an
expiry of at most HOLD_S, which the holder pushes back every third of it while the lease
counts. A replica that dies holding one (a crash, SIGKILL, a lost node) stops pushing it
back: the conversation is free again within HOLD_S. A lapsing lease is kept only until its
lapse is due; its key then expires by itself."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from server.api.conversation_locks import locked
from server.store import StateUnavailable
from server.store.redis_leases import RedisLeases

logger = logging.getLogger("vlserve.api")

HOLD_S = 15.0  # a dead replica's hold outlives it this long at most


class SharedConversationLease:
    """A lease in the shared store (server.api.conversation_locks.Lease). One task per
    lease makes its every call to Redis, in order: a push-back still on its way can never
    land after the release's drop and hold the conversation again."""

    def __init__(self, locks: SharedConversationLocks, conversation_id: str, token: str,
                 lapses: bool) -> None:
        self._locks = locks
        self.conversation_id = conversation_id
        self.lapses = lapses
        self.released = False
        self._token = token
        self._touched = time.monotonic()
        self._wake = asyncio.Event()  # pinned, touched or released: act now
        self.keeper = asyncio.create_task(self._keep(), name=f"lock {conversation_id}")
        locks.keepers.add(self.keeper)  # the loop holds tasks weakly: kept until done
        self.keeper.add_done_callback(locks.keepers.discard)

    def pin(self) -> None:
        self.lapses = False
        self._wake.set()

    def touch(self) -> None:
        self._touched = time.monotonic()
        self._wake.set()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._wake.set()

    async def aclose(self) -> None:
        self.release()
        await asyncio.wait([self.keeper])  # not cancelled with its waiter: the drop is made

    def _ttl_s(self) -> float:
        """How long the store keeps the hold from now on; <= 0: it has lapsed."""
        hold_s = self._locks.hold_s
        if not self.lapses:
            return hold_s
        return min(hold_s, self._locks.lapse_s - (time.monotonic() - self._touched))

    async def _keep(self) -> None:
        leases, cid = self._locks.leases, self.conversation_id
        while not self.released:
            # A lapsed lease waits for a touch, a pin or its release, but not for ever: one
            # never given back (its stream never started) would keep this task for the
            # process's life. Its key has expired by then: there is nothing to drop.
            counting = self._ttl_s() > 0
            try:
                await asyncio.wait_for(self._wake.wait(), self._locks.hold_s / 3
                                       if counting else self._locks.lapse_s)
            except asyncio.TimeoutError:
                if not counting and self._ttl_s() <= 0:
                    return
            self._wake.clear()
            ttl_s = self._ttl_s()
            if self.released or ttl_s <= 0:
                continue
            try:
                if not await leases.keep(cid, self._token, ttl_s):
                    logger.warning("conversation %s: its lock lapsed and another response "
                                   "holds it now", cid)
                    return
            except StateUnavailable as exc:  # tried again in a third of the hold
                logger.warning("conversation %s: lock not renewed: %s", cid, exc)
            except Exception:  # a bug: the hold expires by itself within hold_s
                logger.exception("conversation %s: lock not renewed", cid)
        try:
            await leases.drop(cid, self._token)
        except StateUnavailable as exc:
            logger.warning("conversation %s: lock not given back (it expires within %g s): "
                           "%s", cid, self._locks.hold_s, exc)


class SharedConversationLocks:
    """The conversations held by any replica sharing the store."""

    def __init__(self, leases: RedisLeases, lapse_s: float, hold_s: float = HOLD_S) -> None:
        self.leases = leases
        self.lapse_s = lapse_s  # as server.api.conversation_locks.ConversationLocks
        self.hold_s = hold_s
        self.keepers: set[asyncio.Task[None]] = set()  # one per lease held here

    async def acquire(self, conversation_id: str, *, lapses: bool = False
                      ) -> SharedConversationLease:
        token = secrets.token_hex(16)
        ttl_s = min(self.hold_s, self.lapse_s) if lapses else self.hold_s
        if not await self.leases.take(conversation_id, token, ttl_s):
            raise locked()
        return SharedConversationLease(self, conversation_id, token, lapses)
