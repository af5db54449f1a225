"""A reusable llama_batch with plain setters (filled in place: no allocation per step)."""

from __future__ import annotations

import llama_cpp


class TokenBatch:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b, i = self._batch, self.n
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits
        self.n = i + 1

    def decode(self, ctx: llama_cpp.llama_context_p) -> int:
        self._batch.n_tokens = self.n
        return llama_cpp.llama_decode(ctx, self._batch)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self._batch)
