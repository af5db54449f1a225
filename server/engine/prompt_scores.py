"""Log-probabilities of a prompt's own tokens (text completions with `echo` and `logprobs`:
what evaluation tools score answers with). Engine thread only.

The logits at position p predict token p + 1, so every prompt token is evaluated with its
logits kept. A step keeps at most ROWS_PER_STEP of them, for all scored prompts together:
llama.cpp holds a row of n_vocab floats for each (a 262k vocabulary: 1 MB a row) and keeps
its output buffer at the largest size a step needed, and each row's log-softmax runs here,
on the engine thread, between the other streams' tokens (vectorised over the step's rows,
on a 262k vocabulary: ~0.6 ms a row, ~3.5 ms with 2 or more top_logprobs to pick).
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np

from server.engine.jobs import Job, PrefillItem
from server.engine.logprobs import PromptLogprobs, TokenLogprob
from server.engine.model import LoadedModel
from server.engine.mtmd import TokenizedPrompt
from server.engine.prompt_text import prompt_texts
from server.engine.types import GenerationRequest

ROWS_PER_STEP = 16


def new_scores(request: GenerationRequest, prompt: TokenizedPrompt, model: LoadedModel
               ) -> PromptLogprobs | None:
    """Where a job's prompt scores go, if its request asks for them."""
    if not request.prompt_logprobs:
        return None
    tokens = prompt.chunks[0].tokens
    return PromptLogprobs(prompt_texts(model, tokens, written=request.prompt is not None),
                          [None] * len(tokens))


def score(job: Job, item: PrefillItem, first_index: int, n: int, model: LoadedModel) -> None:
    """Score the prompt tokens after the `n` just evaluated from `item.start` (batch rows
    from `first_index`). Resumed work (a preempted job's generated tokens) scores nothing."""
    scores = job.prompt_logprobs
    assert scores is not None
    if item.chunk is not job.prompt.chunks[0]:
        return
    tokens = item.chunk.tokens
    targets = list(range(item.start + 1, min(item.start + n + 1, len(tokens))))
    scores.upto = max(scores.upto, item.start + n)
    if not targets:
        return
    logits = _rows(model, first_index, len(targets))
    shifted = logits - logits.max(axis=1, keepdims=True)
    logsum = np.log(np.exp(shifted).sum(axis=1, dtype=np.float64))
    chosen = shifted[np.arange(len(targets)), [tokens[p] for p in targets]] - logsum
    top_k = job.request.top_logprobs or 0
    best = _best(shifted, top_k)
    pieces = model.pieces
    for row, position in enumerate(targets):
        top = tuple((pieces[int(t)], float(shifted[row, t] - logsum[row])) for t in best[row])
        scores.scored[position] = TokenLogprob(scores.texts[position], float(chosen[row]), top)


def _rows(model: LoadedModel, first_index: int, m: int) -> np.ndarray:
    """The logits of `m` consecutive batch rows: one view where llama.cpp stored them one
    after the other (as it does, in batch order), else a copy row by row."""
    pointers = [ctypes.cast(llama_cpp.llama_get_logits_ith(model.ctx, first_index + j),
                            ctypes.c_void_p).value or 0 for j in range(m)]
    stride = model.n_vocab * ctypes.sizeof(ctypes.c_float)
    if all(p == pointers[0] + j * stride for j, p in enumerate(pointers)):
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, first_index),
                                     shape=(m, model.n_vocab))
    return np.stack([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(
        model.ctx, first_index + j), shape=(model.n_vocab,)) for j in range(m)])


def _best(shifted: np.ndarray, k: int) -> np.ndarray:
    """Each row's k highest columns, highest first."""
    if k == 0:
        return np.empty((len(shifted), 0), dtype=np.int64)
    if k == 1:
        return shifted.argmax(axis=1)[:, None]
    best = np.argpartition(shifted, -k, axis=1)[:, -k:]  # no negated copy: twice as fast
    order = np.argsort(-np.take_along_axis(shifted, best, axis=1), axis=1)
    return np.take_along_axis(best, order, axis=1)
