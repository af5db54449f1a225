"""Prompt lookup: drafts taken from the request's own text when the client sent no
prediction (self-speculative decoding by n-grams, as llama-server's `--spec-type ngram-*`
and vLLM's `ngram` method do).

An answer often repeats what is already in its context: a document it quotes or edits, code
it rewrites, a list it continues, a phrase it loops on. When the answer's last few tokens
occurred before (earlier in the answer, else in the prompt), the tokens that followed them
then are the draft; server/engine/drafts.py checks it the same way as a client's prediction,
so the answer is the same as without it.

Most text does not repeat, and on a CPU a refused draft costs up to a whole step, so such a
guess is trusted only as far as it has been right: every step's guess is checked against
the token the model then writes, drafted or not (a dictionary lookup, no decoding), and
server/engine/prediction.py's DraftPace drafts only as long as that record pays.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.engine.mtmd import PromptChunk
from server.engine.prediction import NGRAM, Prediction

# The fewest of the answer's last tokens a lookup must match: one common token (a space, a
# comma) occurs everywhere, and its followers are mostly noise.
LEAST = 2
# Where an image sits in the prompt's tokens: no n-gram or draft runs across it.
IMAGE = -1
# Only the prompt's last this many tokens are indexed: indexing takes about 2 us a token
# in a worker thread that holds the GIL meanwhile (64 ms for 32k tokens, 380 ms for 128k),
# and what an answer repeats is mostly near the prompt's end (the latest turns, the
# document just sent).
PROMPT_WINDOW = 32768
# Before any guess has been checked, the share of guessed tokens expected to be right: low,
# so a step drafts only where drafts are nearly free (a GPU) until the record says more.
PRIOR_KEPT = 0.3
# A lookup's draft must give the step this many times the tokens per unit of time of none,
# by the measured step costs: they leave out what each drafted position costs besides
# (sampling it, taking it back), which decides a draft that pays by a little. Measured on
# the bench demo model with 4 clients: drafts kept half the time gave 0.92x the aggregate.
MARGIN = 1.1


def prompt_index(chunks: Sequence[PromptChunk]) -> Prediction:
    """The prompt's last PROMPT_WINDOW text tokens, indexed for lookup (built off the engine
    thread); each image is one IMAGE entry."""
    tokens: list[int] = []
    for chunk in chunks:
        if chunk.image is None:
            tokens.extend(chunk.tokens)
        else:
            tokens.append(IMAGE)
    return Prediction.of(tokens[-PROMPT_WINDOW:], shortest=LEAST)


class ContextLookup:
    """One answer's lookup: the answer's own n-grams (most recent occurrence first), then
    the prompt's (where the answer last followed the prompt first). Positions it returns
    count the prompt's tokens, then the answer's. Engine thread only."""

    def __init__(self, prompt: Prediction) -> None:
        self._prompt = prompt
        self._answer: list[int] = []
        # n-gram of the answer → where the latest of its occurrences that has a token after
        # it ends (that token's index in the answer).
        self._latest: dict[tuple[int, ...], int] = {}

    def draft(self, written: Sequence[int], cursor: int, limit: int, least: int = LEAST
              ) -> tuple[int, tuple[int, ...]]:
        """As Prediction.draft: up to `limit` tokens to follow `written` (the answer so far,
        its last token sampled but not yet decoded), with where they were found."""
        self._extend(written)
        least = max(least, LEAST)
        if limit <= 0 or len(written) < least:
            return -1, ()
        offset = len(self._prompt.tokens)
        for n in range(min(NGRAM, len(written)), least - 1, -1):
            end = self._latest.get(tuple(written[-n:]))
            if end is not None:
                return offset + end, self._copied(end, limit)
        at, tokens = self._prompt.draft(written, cursor, limit, least)
        if IMAGE in tokens:
            tokens = tokens[:tokens.index(IMAGE)]
        return (at, tokens) if tokens else (-1, ())

    def _extend(self, written: Sequence[int]) -> None:
        """Index the n-grams that now have a token after them."""
        answer = self._answer
        for token in written[len(answer):]:
            answer.append(token)
            last = len(answer) - 1  # its n-grams end here and have it after them
            for n in range(LEAST, NGRAM + 1):
                if last >= n:
                    self._latest[tuple(answer[last - n:last])] = last

    def _copied(self, start: int, limit: int) -> tuple[int, ...]:
        """The answer from `start` on, `limit` tokens, where a copy that runs into the text
        it is still writing repeats that too (a loop of 5 tokens drafts 16, not 5)."""
        answer, out = self._answer, []
        for i in range(limit):
            at = start + i
            out.append(answer[at] if at < len(answer) else out[at - len(answer)])
        return tuple(out)
