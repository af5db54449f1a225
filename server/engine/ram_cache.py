"""Idle slots' KV in host RAM instead of the unified KV cache (llama-server's --cache-ram
and --cache-idle-slots do the same). Every cell any sequence holds widens the span each
decode step attends over (masked or not): four idle 900-token conversations slowed a single
stream from about 130 to 100 tok/s on the bench model. So once a request runs long
(Starter.spill_idle), the idle slots' sequences are saved here (llama_state_seq_get_data)
and removed from the KV cache; a later request that continues one of them gets it back
(llama_state_seq_set_data) instead of evaluating its prefix, images included, again.
Engine thread only."""

from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict
from dataclasses import dataclass

import llama_cpp

from server.engine.jobs import Slot
from server.engine.prefix import KvEntries, KvKey, longest_match

logger = logging.getLogger("vlserve.engine")

# Shorter sequences (a bare template prefix) are not worth a copy.
MIN_ENTRIES = 16


@dataclass(frozen=True)
class SavedSequence:
    tenant: str
    keys: tuple[KvKey, ...]
    n_past: int
    data: ctypes.Array[ctypes.c_ubyte]


class RamPrefixCache:
    def __init__(self, ctx: llama_cpp.llama_context_p, budget_bytes: int) -> None:
        self._ctx = ctx
        self.budget = budget_bytes
        self._entries: OrderedDict[tuple[str, tuple[KvKey, ...]], SavedSequence] = \
            OrderedDict()
        self.bytes = 0
        self.saves = 0
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

    def save(self, slot: Slot) -> None:
        """Keep a copy of what `slot` holds (once per content), evicting the least recently
        used copies past the budget."""
        if len(slot.cached) < MIN_ENTRIES:
            return
        key = (slot.tenant, tuple(slot.cached))
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        size = llama_cpp.llama_state_seq_get_size(self._ctx, slot.seq_id)
        if not size or size > self.budget:
            return
        data = (ctypes.c_ubyte * size)()
        if llama_cpp.llama_state_seq_get_data(self._ctx, data, size, slot.seq_id) != size:
            logger.warning("saving slot %d's KV to RAM failed", slot.seq_id)
            return
        self._entries[key] = SavedSequence(slot.tenant, key[1], slot.n_past, data)
        self.bytes += size
        self.saves += 1
        while self.bytes > self.budget:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= len(dropped.data)

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
        slot.cached = KvEntries(saved.keys)
        slot.n_past = saved.n_past
        slot.tenant = saved.tenant
        self.restores += 1
        return True
