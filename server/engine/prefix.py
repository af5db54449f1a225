"""What a slot's KV cache holds, and how much of a new prompt it already covers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NoReturn, TypeVar

from server.engine.mtmd import ImageKey

KvKey = int | ImageKey  # a text token id, or a whole image
T = TypeVar("T")


class KvEntries(list[KvKey]):
    """A slot's KV entries that keep their cell count as they change: the scheduler asks
    for every slot's cells several times a step, and summing them was O(context) per token
    (a fifth of the engine thread at 3,000 tokens on the tiny model). Only the mutations
    the engine uses are allowed; the others would let the count drift."""

    def __init__(self, keys: Iterable[KvKey] = ()) -> None:
        super().__init__(keys)
        self.cells = n_tokens(self)

    def append(self, key: KvKey) -> None:
        super().append(key)
        self.cells += 1 if isinstance(key, int) else key.n_tokens

    def extend(self, keys: Iterable[KvKey]) -> None:
        start = len(self)
        super().extend(keys)
        self.cells += n_tokens(self[start:])

    def __iadd__(self, keys: Iterable[KvKey]) -> KvEntries:  # type: ignore[override]
        self.extend(keys)
        return self

    def truncate(self, keep: int) -> None:
        """Keep the first `keep` entries."""
        self.cells -= n_tokens(self[keep:])
        super().__delitem__(slice(keep, None))

    def clear(self) -> None:
        super().clear()
        self.cells = 0

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("KvEntries changes only by append, extend, truncate and clear")

    insert = pop = remove = sort = reverse = __setitem__ = __delitem__ = _refuse  # type: ignore[assignment]
    __imul__ = _refuse  # type: ignore[assignment]


def n_cells(entries: Sequence[KvKey]) -> int:
    return entries.cells if isinstance(entries, KvEntries) else n_tokens(entries)


def common_prefix_len(cached: Sequence[KvKey], prompt: Sequence[KvKey]) -> int:
    """Number of leading entries the slot can keep; at least one prompt entry is left
    to evaluate, because sampling needs the logits of the prompt's last token."""
    limit = min(len(cached), len(prompt) - 1)
    n = 0
    while n < limit and cached[n] == prompt[n]:
        n += 1
    return max(n, 0)


def longest_match(candidates: Iterable[tuple[T, Sequence[KvKey]]], keys: Sequence[KvKey],
                  floor: int = 0) -> tuple[T | None, int]:
    """The candidate whose entries share the longest prefix with `keys` (more than `floor`
    entries), and that length; (None, floor) when none beats it."""
    found: T | None = None
    longest = floor
    for candidate, entries in candidates:
        if len(entries) > longest:
            n = common_prefix_len(entries, keys)
            if n > longest:
                found, longest = candidate, n
    return found, longest


def n_positions(keys: Sequence[KvKey]) -> int:
    """KV positions the entries occupy (an image may use fewer positions than tokens)."""
    return sum(1 if isinstance(k, int) else k.n_pos for k in keys)


def n_tokens(keys: Iterable[KvKey]) -> int:
    """KV cells the entries occupy (an image's tokens each take one)."""
    return sum(1 if isinstance(k, int) else k.n_tokens for k in keys)
