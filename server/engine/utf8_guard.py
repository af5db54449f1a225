"""Keeps a constrained answer valid UTF-8 token by token.

llama.cpp's grammar decodes token bytes leniently: overlong forms, surrogates and code points
past U+10FFFF pass as characters, so byte tokens could spell text that no JSON parser reads
(a random-weight model does so within a dozen answers). Python's strict decoder is the
judge; only tokens that can finish a begun character are ever looked at one by one.
"""

from __future__ import annotations

import codecs

import numpy as np

# The second byte's range after the lead bytes that restrict it (RFC 3629): the incremental
# decoder only notices a surrogate or an out-of-range code point at the third byte, by
# which time the answer would be stuck with no valid continuation.
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _strict_tail(data: bytes) -> bytes | None:
    """The incomplete character `data` ends with (b"" if none), or None if invalid."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        decoder.decode(data, final=False)
    except UnicodeDecodeError:
        return None
    tail: bytes = decoder.getstate()[0]
    if len(tail) >= 2 and tail[0] in _SECOND_BYTE:
        low, high = _SECOND_BYTE[tail[0]]
        if not low <= tail[1] <= high:
            return None
    return tail


class Utf8Vocab:
    """Per-vocabulary facts, computed once (by token id): which pieces can't follow a
    complete character, and which begin with a continuation byte (the only ones that can
    finish a begun one)."""

    def __init__(self, pieces: list[bytes], eog_tokens: frozenset[int] = frozenset()) -> None:
        self.pieces = pieces
        self.invalid_alone = np.array([bool(p) and _strict_tail(p) is None for p in pieces])
        self.continues = np.array([bool(p) and 0x80 <= p[0] < 0xC0 for p in pieces])
        # First byte of each piece if ASCII, else 128; and for each ASCII character that is
        # a piece of its own, one token spelling it (the grammar's prefilter probes these).
        self.first_ascii = np.array([p[0] if p and p[0] < 0x80 else 128 for p in pieces],
                                    dtype=np.int64)
        probes = {p[0]: t for t, p in reversed(list(enumerate(pieces)))
                  if len(p) == 1 and p[0] < 0x80 and t not in eog_tokens}
        self.probe_chars = np.array(sorted(probes), dtype=np.int64)
        self.ascii_probes = np.array([probes[c] for c in self.probe_chars], dtype=np.int32)


class Utf8Guard:
    """The answer's own state: the bytes of a character begun but not yet finished."""

    def __init__(self, vocab: Utf8Vocab) -> None:
        self.vocab = vocab
        self.pending = b""

    def allows(self, token: int) -> bool:
        return _strict_tail(self.pending + self.vocab.pieces[token]) is not None

    def mask(self, ids: np.ndarray, logits: np.ndarray) -> None:
        """Set -inf on the logit of every candidate token that would break the text."""
        if not self.pending:
            logits[self.vocab.invalid_alone[ids]] = -np.inf
            return
        may_continue = self.vocab.continues[ids]
        for i in np.flatnonzero(may_continue):
            if not self.allows(int(ids[i])):
                may_continue[i] = False
        logits[~may_continue] = -np.inf

    def accept(self, token: int) -> None:
        tail = _strict_tail(self.pending + self.vocab.pieces[token])
        self.pending = tail or b""
