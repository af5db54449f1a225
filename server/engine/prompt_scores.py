"""Log-probabilities of a prompt's own tokens (text completions with `echo` and `logprobs`:
what evaluation tools score answers with). Engine thread only.

The logits at position p predict token p + 1, so every prompt token is evaluated with its
logits kept. A step keeps at most ROWS_PER_STEP of them per job: llama.cpp holds a row of
n_vocab floats for each (a 262k vocabulary: 1 MB a row), so prefilling a long prompt 512
tokens a step would hold half a gigabyte.
"""

from __future__ import annotations

from server.engine.jobs import Job, PrefillItem
from server.engine.logprobs import PromptLogprobs, token_logprob
from server.engine.model import LoadedModel
from server.engine.mtmd import TokenizedPrompt
from server.engine.types import GenerationRequest

ROWS_PER_STEP = 32


def new_scores(request: GenerationRequest, prompt: TokenizedPrompt, model: LoadedModel
               ) -> PromptLogprobs | None:
    """Where a job's prompt scores go, if its request asks for them."""
    if not request.prompt_logprobs:
        return None
    tokens = prompt.chunks[0].tokens
    return PromptLogprobs(model.pieces[tokens[0]] if tokens else b"",
                          [None] * len(tokens))


def score(job: Job, item: PrefillItem, first_index: int, n: int, model: LoadedModel) -> None:
    """Score the prompt tokens after the `n` just evaluated from `item.start` (batch rows
    from `first_index`). Resumed work (a preempted job's generated tokens) scores nothing."""
    scores = job.prompt_logprobs
    assert scores is not None
    if item.chunk is not job.prompt.chunks[0]:
        return
    tokens = item.chunk.tokens
    top_k = job.request.top_logprobs or 0
    for j in range(n):
        position = item.start + j + 1  # the token these logits predict
        if position < len(tokens):
            scores.scored[position] = token_logprob(
                model.ctx, first_index + j, model.n_vocab, tokens[position], top_k,
                model.pieces)
    scores.upto = max(scores.upto, item.start + n)
