"""What a table promises, whichever backend holds it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bounds:
    """A table's limits and eviction rule.

    An owner's new entry first evicts that owner's own entries (least recently used when
    `lru`, else oldest) while the owner is over its share. When the table as a whole is
    still full, `evict_others` evicts the oldest entries of all; otherwise the newcomer is
    refused (TableFull), so one client can never push out another's files.
    """

    max_count: int
    max_bytes: int
    ttl_s: float
    max_count_per_owner: int
    max_bytes_per_owner: int
    lru: bool = False  # reads refresh an entry (uploads); else oldest first (responses)
    evict_others: bool = False


class TableFull(Exception):
    """The table is full and the owner has nothing of its own left to evict."""


class StateUnavailable(Exception):
    """The shared store cannot be reached (or answered too late): the API says 503."""
