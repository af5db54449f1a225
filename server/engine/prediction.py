"""OpenAI's Predicted Outputs: the client's guess of the answer (`prediction`, e.g. the file
it asks to edit) as draft tokens that one decode step checks together.

Each step a generating request with a prediction also puts the predicted tokens that would
follow its latest ones into the batch; the sampler then runs at each of their positions in
turn, and a draft token is kept only while the sampler picks exactly it. The answer is
therefore the one the model writes without a prediction (greedy or sampled alike: every
token is still drawn from the model's own distribution at its position); a good guess only
means fewer steps. Where the answer departs from the prediction (an edit), the lookup finds
its place again from the last few tokens written (n-gram lookup, as in prompt-lookup
decoding), so the unchanged text after an edit is drafted again.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.engine.step_costs import StepCosts

# Longest run of the answer's last tokens looked up in the prediction; longer runs are
# rarer by chance, so they are tried first.
NGRAM = 3
# A single matching token is taken for the place only this far after where the answer last
# followed the prediction (or at the answer's start): a common token found anywhere else
# would mostly draft text the model then refuses, and every refused draft costs a decode
# position (with its logits: a large vocabulary's output row).
NEAR = 16
# After a draft of which nothing was kept (or when none would pay), drafting rests for 1,
# 2, 4, ... steps, at most this many: a prediction the answer does not follow (unrelated
# text, or a stretch the answer rewrites) then costs a few wasted positions, not some at
# every step; on a CPU a wasted position costs up to a whole step.
MAX_REST = 64


@dataclass(frozen=True)
class Prediction:
    """A predicted answer's tokens, indexed by every run of up to NGRAM tokens: built once
    per request (off the engine thread), shared by its `n > 1` choices."""

    tokens: tuple[int, ...]
    # n-gram → the positions right after each of its occurrences that have a token after
    # them, ascending.
    _follows: dict[tuple[int, ...], list[int]] = field(repr=False, compare=False)

    @classmethod
    def of(cls, tokens: Sequence[int], shortest: int = 1) -> Prediction:
        """`shortest`: the shortest runs indexed (a lookup never asks for shorter ones)."""
        kept = tuple(tokens)
        follows: dict[tuple[int, ...], list[int]] = {}
        for n in range(shortest, NGRAM + 1):
            for end in range(n, len(kept)):
                follows.setdefault(kept[end - n:end], []).append(end)
        return cls(kept, follows)

    def draft(self, written: Sequence[int], cursor: int, limit: int, least: int = 1
              ) -> tuple[int, tuple[int, ...]]:
        """Up to `limit` predicted tokens to follow the answer's tokens `written` (the last
        one sampled, not yet decoded), as (their position in the prediction, the tokens);
        (-1, ()) when the prediction has nothing that follows. `cursor`: where the answer
        last followed the prediction, preferred when the same text occurs more than once;
        `least`: the fewest last tokens that must match."""
        if limit <= 0 or not written:
            return -1, ()
        at = self._place(written, cursor, least)
        if at < 0:
            return -1, ()
        return at, self.tokens[at:at + limit]

    def _place(self, written: Sequence[int], cursor: int, least: int) -> int:
        for n in range(min(NGRAM, len(written)), least - 1, -1):
            ends = self._follows.get(tuple(written[-n:]))
            if not ends:
                continue
            i = bisect_left(ends, cursor)
            if n > 1:
                return ends[i] if i < len(ends) else ends[-1]
            # A single token: at the answer's start anywhere, later only just ahead.
            if len(written) == 1:
                return ends[i] if i < len(ends) else ends[0]
            if i < len(ends) and ends[i] - cursor <= NEAR:
                return ends[i]
        return -1


# Before a request's drafts have been checked: the share of predicted tokens the answer is
# expected to keep, weighed as this many tokens seen (a client predicts what it expects).
PRIOR_KEPT = 0.9
PRIOR_WEIGHT = 5.0
# Each check's evidence outweighs older checks' by this factor: the answer may follow the
# prediction for a while, rewrite a stretch of it, then follow it again.
FORGET = 0.8


@dataclass
class DraftPace:
    """How many predicted tokens a request drafts next: the length that gives its step the
    most tokens per unit of time, from the share of drafted tokens the answer has kept so
    far (each a chance that the next is kept too) and what longer steps cost (`costs`,
    measured at warm-up: server/engine/step_costs.py). After a draft of which nothing was
    kept, or while no length pays, drafting rests for 1, 2, 4, ... steps, then probes as
    trusting as at the start; only a check that kept some, after which drafting pays
    again, ends the growing rests. So a prediction the answer does not follow, or rewrites
    densely, costs a few probes, not every step."""

    most: int
    costs: StepCosts
    kept_weight: float = PRIOR_KEPT * PRIOR_WEIGHT
    seen_weight: float = PRIOR_WEIGHT
    rest: int = 0
    misses: int = 0
    # A lookup's pace (server/engine/lookup.py): every step's guess is checked, drafted or
    # not (`observed`), so its record is never stale and it needs no rests or probes.
    watching: bool = False
    # How many times no draft's rate a draft must give (best_length).
    margin: float = 1.0
    _probe: bool = False
    _base: int = 1  # positions beside the last draft: what `checked` judges it against

    @classmethod
    def watched(cls, most: int, costs: StepCosts, prior: float, margin: float
                ) -> DraftPace:
        """The pace of guesses checked at every step, trusted at first as far as `prior`."""
        return cls(most, costs, prior * PRIOR_WEIGHT, PRIOR_WEIGHT, watching=True,
                   margin=margin)

    @property
    def kept_share(self) -> float:
        return self.kept_weight / self.seen_weight

    @property
    def least_match(self) -> int:
        """The fewest of the answer's last tokens a draft must follow: a probe waits for
        NGRAM (a stray match of a common word or two is what the rest was for)."""
        return NGRAM if self._probe else 1

    def step(self) -> None:
        """The request's decode step is built (called once per step, after allowed):
        rests are counted in steps."""
        if self.rest:
            self.rest -= 1
            # Rested: probe as trusting as at the start, or none would ever pay again.
            self._probe = not self.rest

    def allowed(self, base: int, offered: int, cap: int | None = None) -> int:
        """The draft to take of `offered` predicted tokens beside the `base` positions
        already in the step (0: none pays, or resting), at most `cap` (the bound on other
        streams' wait: a draft it holds back is no miss, and starts no rest)."""
        if self.rest:
            return 0
        kept = self._trust
        longest = min(self.most, offered)
        length = self._best(kept, base, longest if cap is None else min(longest, cap))
        if not length and cap is not None and cap < longest \
                and self._best(kept, base, longest):
            return 0  # a longer draft would pay: held back, the pace as it was
        self._probe = False
        self._base = base
        if not length and not self.watching:
            self._rested()
            self.rest += 1  # this step's own step() is still to come
        return length

    def _best(self, kept: float, base: int, most: int) -> int:
        return best_length(kept, self.costs, base, most, self.margin)

    @property
    def _trust(self) -> float:
        """The share of drafted tokens expected kept: a probe trusts as at the start."""
        return max(self.kept_share, PRIOR_KEPT) if self._probe else self.kept_share

    def expected(self, base: int, offered: int) -> float:
        """The tokens this stream expects from the step, with the draft `allowed` would take
        of `offered` (unbounded) beside `base` positions: 1 when it would take none."""
        if self.rest:
            return 1.0
        kept = self._trust
        length = self._best(kept, base, min(self.most, offered))
        return sum(kept ** i for i in range(length + 1))

    def checked(self, proposed: int, kept: int) -> None:
        """`kept` of the `proposed` drafted tokens were the answer's."""
        # A draft kept in part is `kept` tokens that stayed and one that did not; a draft
        # kept whole says nothing about the token after it.
        self.kept_weight = self.kept_weight * FORGET + kept
        self.seen_weight = self.seen_weight * FORGET + kept + (kept < proposed)
        if kept and self._best(self.kept_share, self._base, self.most):
            self.misses = 0
        elif not self.watching:  # nothing kept (a stray match), or too little (dense
            self._rested()  # edits): rest, longer each time

    def observed(self, right: bool) -> None:
        """A watched guess that was not drafted was (`right`) or was not the token the
        answer then got: evidence as a one-token draft's, and free."""
        self.kept_weight = self.kept_weight * FORGET + right
        self.seen_weight = self.seen_weight * FORGET + 1

    def _rested(self) -> None:
        self.misses += 1
        self.rest = min(MAX_REST, 2 ** (self.misses - 1))


def best_length(kept: float, costs: StepCosts, base: int, most: int, margin: float = 1.0
                ) -> int:
    """The draft length (0 to `most`) that gives a step the most tokens per unit of time,
    when each drafted token is kept with chance `kept` if the ones before it were. The
    step's `base` positions give a token each (the other streams' too: a draft must pay
    for the time it adds to theirs); `length` more give 1 + kept + kept² + ... in place of
    this stream's one, for what they add to the step's time. A draft must beat no draft by
    `margin` times."""
    best, best_rate = 0, float(base) * margin
    expected, term = 1.0, 1.0
    for length in range(1, most + 1):
        term *= kept
        expected += term
        rate = (base - 1 + expected) / costs.extra(base, length)
        if rate > best_rate:
            best, best_rate = length, rate
    return best
