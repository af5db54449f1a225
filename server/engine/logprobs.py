"""Per-token log-probabilities (OpenAI `logprobs` / `top_logprobs`), computed only on request."""

from __future__ import annotations

from dataclasses import dataclass, field

import llama_cpp
import numpy as np


@dataclass(frozen=True)
class TokenLogprob:
    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...]  # the k most likely tokens, most likely first


@dataclass
class PromptLogprobs:
    """Each prompt token's log-probability given the ones before it (server/engine/
    prompt_scores.py): `scored[p]` for position p ≥ 1; nothing predicts the first."""

    texts: list[bytes]  # each token's text, joining to the echoed prompt (prompt_text.py)
    scored: list[TokenLogprob | None]
    upto: int = field(default=0, repr=False)  # positions 0 … upto - 1 have had their logits


def token_logprob(ctx: int, batch_index: int, n_vocab: int, token: int, top_k: int,
                  pieces: list[bytes]) -> TokenLogprob:
    """Log-softmax of the model's raw logits at one batch position (before sampling)."""
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, batch_index),
                                   shape=(n_vocab,))
    shifted = logits - logits.max()
    logsum = float(np.log(np.exp(shifted, dtype=np.float64).sum()))
    top: tuple[tuple[bytes, float], ...] = ()
    if top_k > 0:
        best = np.argpartition(-shifted, top_k - 1)[:top_k]
        best = best[np.argsort(-shifted[best])]
        top = tuple((pieces[int(t)], float(shifted[t]) - logsum) for t in best)
    return TokenLogprob(pieces[token], float(shifted[token]) - logsum, top)
