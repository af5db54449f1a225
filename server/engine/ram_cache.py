"""Idle slots' KV in host RAM instead of the unified KV cache (llama-server's --cache-ram
and --cache-idle-slots do the same). Every cell any sequence holds widens the span each
decode step attends over (masked or not): four idle 900-token conversations slowed a single
stream from about 130 to 100 tok/s on the bench model. So an idle engine copies idle slots'
sequences here (llama_state_seq_get_data) ahead of need, and a new request starts with
those out of the KV cache (Starter.place); idle slots not copied yet go once a request
runs long (Starter.spill_idle). A later request that continues one of them gets it back
(llama_state_seq_set_data) instead of evaluating its prefix, images included, again.
Engine thread only."""

from __future__ import annotations

import ctypes
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import llama_cpp

from server.engine.jobs import Slot
from server.engine.prefix import KvEntries, KvKey, longest_match

logger = logging.getLogger("vlserve.engine")

# Shorter sequences (a bare template prefix) are not worth a copy.
MIN_ENTRIES = 16


@dataclass
class SavedSequence:
    tenant: str
    keys: tuple[KvKey, ...]
    n_past: int
    data: ctypes.Array[ctypes.c_ubyte]
    used_at: float  # saved or restored last (time.monotonic())


class RamPrefixCache:
    def __init__(self, ctx: llama_cpp.llama_context_p, budget_bytes: int) -> None:
        self._ctx = ctx
        self.budget = budget_bytes
        self._entries: OrderedDict[tuple[str, tuple[KvKey, ...]], SavedSequence] = \
            OrderedDict()
        self.bytes = 0
        # Read by /metrics from another thread (ints: no lock).
        self.copies_ahead = 0  # made while the engine idled
        self.copies_needed = 0  # made while requests ran (every stream waited)
        self.restores = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def worth_saving(slot: Slot, keep: int) -> bool:
        """Whether to copy `slot` out before a request that keeps only its first `keep`
        entries overwrites the rest. A copy costs time in proportion to the whole sequence
        (about 25 ms for 260 tokens of the bench model, on the engine thread: every stream
        waits), and pays back only the part lost: a regenerated or edited last message
        (most of the sequence kept) is not worth one."""
        lost = len(slot.cached) - keep
        return lost >= MIN_ENTRIES and lost * 4 >= len(slot.cached)

    def holds(self, slot: Slot) -> bool:
        """Whether a copy of what `slot` holds is here, maybe longer (its cells may go for
        free: a restore of the longer copy keeps as much as a request matches)."""
        return self._holder(slot.tenant, tuple(slot.cached)) is not None

    def _holder(self, tenant: str, keys: tuple[KvKey, ...]
                ) -> tuple[str, tuple[KvKey, ...]] | None:
        if (tenant, keys) in self._entries:
            return tenant, keys
        n = len(keys)
        if not n:
            return None
        # The last key first: it tells most copies apart without slicing (this runs for
        # every idle slot as a request starts, over every copy).
        return next((k for k in self._entries if k[0] == tenant and len(k[1]) > n
                     and k[1][n - 1] == keys[n - 1] and k[1][:n] == keys), None)

    def save_ahead(self, slot: Slot) -> bool:
        """Copy `slot` while the engine idles, so its cells may go for free later. Room is
        made only from copies used before the slot's conversation was (LRU, with the slot
        as used when its last job ended): a copy made ahead of need never pushes out a
        conversation used more recently. Whether the slot is held now."""
        if len(slot.cached) < MIN_ENTRIES:
            return False
        if self.holds(slot):
            return True
        size = llama_cpp.llama_state_seq_get_size(self._ctx, slot.seq_id)
        if not size or size > self.budget:
            return False
        room = self.budget - self.bytes
        for saved in self._entries.values():  # least recently used first
            if room >= size:
                break
            if saved.used_at >= slot.idle_since:
                return False
            room += len(saved.data)
        if room < size:
            return False
        if not self._copy(slot):
            return False
        self.copies_ahead += 1
        return True

    def save(self, slot: Slot) -> None:
        """Keep a copy of what `slot` holds (once: a copy of it or of more is touched
        instead), evicting the least recently used copies past the budget. The tenant's
        copies of a prefix of it go: whatever request matched them matches this as far."""
        if self._copy(slot):
            self.copies_needed += 1

    def _copy(self, slot: Slot) -> bool:
        """save(); whether a copy was made."""
        if len(slot.cached) < MIN_ENTRIES:
            return False
        key = (slot.tenant, tuple(slot.cached))
        held = self._holder(*key)
        if held is not None:
            self._entries.move_to_end(held)
            self._entries[held].used_at = time.monotonic()
            return False
        size = llama_cpp.llama_state_seq_get_size(self._ctx, slot.seq_id)
        if not size or size > self.budget:
            return False
        data = (ctypes.c_ubyte * size)()
        if llama_cpp.llama_state_seq_get_data(self._ctx, data, size, slot.seq_id) != size:
            logger.warning("saving slot %d's KV to RAM failed", slot.seq_id)
            return False
        keys = key[1]
        for old in [k for k in self._entries
                    if k[0] == slot.tenant and len(k[1]) < len(keys)
                    and keys[len(k[1]) - 1] == k[1][-1] and keys[:len(k[1])] == k[1]]:
            self.bytes -= len(self._entries.pop(old).data)
        self._entries[key] = SavedSequence(slot.tenant, keys, slot.n_past, data,
                                           time.monotonic())
        self.bytes += size
        while self.bytes > self.budget:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= len(dropped.data)
        return True

    def best(self, keys: list[KvKey], tenant: str) -> tuple[SavedSequence | None, int]:
        """The saved sequence of `tenant` sharing the longest prefix with `keys`."""
        return longest_match(((saved, saved.keys) for saved in self._entries.values()
                              if saved.tenant == tenant), keys)

    def restore(self, saved: SavedSequence, slot: Slot) -> bool:
        """Put `saved` back as `slot`'s sequence (the slot's own cells go first)."""
        mem = llama_cpp.llama_get_memory(self._ctx)
        llama_cpp.llama_memory_seq_rm(mem, slot.seq_id, -1, -1)
        if llama_cpp.llama_state_seq_set_data(self._ctx, saved.data, len(saved.data),
                                              slot.seq_id) == 0:
            logger.warning("restoring a saved KV sequence into slot %d failed", slot.seq_id)
            slot.cached.clear()
            slot.n_past = 0
            return False
        self._entries.move_to_end((saved.tenant, saved.keys))
        saved.used_at = time.monotonic()
        slot.cached = KvEntries(saved.keys)
        slot.n_past = saved.n_past
        slot.tenant = saved.tenant
        self.restores += 1
        return True
