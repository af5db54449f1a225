"""What a slot's KV cache holds, and how much of a new prompt it already covers."""

from __future__ import annotations

from collections.abc import Sequence

from server.engine.mtmd import ImageKey

KvKey = int | ImageKey  # a text token id, or a whole image


def common_prefix_len(cached: Sequence[KvKey], prompt: Sequence[KvKey]) -> int:
    """Number of leading entries the slot can keep; at least one prompt entry is left
    to evaluate, because sampling needs the logits of the prompt's last token."""
    limit = min(len(cached), len(prompt) - 1)
    n = 0
    while n < limit and cached[n] == prompt[n]:
        n += 1
    return max(n, 0)


def n_positions(keys: Sequence[KvKey]) -> int:
    """KV positions the entries occupy (an image may use fewer positions than tokens)."""
    return sum(1 if isinstance(k, int) else k.n_pos for k in keys)


def n_tokens(keys: Sequence[KvKey]) -> int:
    return sum(1 if isinstance(k, int) else k.n_tokens for k in keys)
