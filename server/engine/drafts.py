"""Predicted drafts in a decode step (server/engine/prediction.py says why and how they are
chosen): put into the batch after the generating slots' tokens, then checked against what
the sampler picks at each of their positions. Engine thread only."""

from __future__ import annotations

from collections.abc import Callable

import llama_cpp

from server.engine.batch import TokenBatch
from server.engine.jobs import Job, Slot
from server.engine.prediction import DraftPace
from server.engine.step_costs import StepCosts
from server.engine.types import BATCH_PRIORITY


def add_drafts(batch: TokenBatch, generating: list[Slot], budget: int,
               max_slowdown: float) -> int:
    """Put the predicted tokens that follow each generating slot's next token into the
    batch, within `budget` cells and at most a request's most drafts in all (the step sizes
    measured at warm-up go that far), shared evenly by the streams whose drafts would pay;
    how many were put. Another request's stream may wait at most `max_slowdown` times as
    long per token as in a step without drafts: a plain stream gets one token a step, so
    the step may last that much longer; one that drafts itself expects more tokens from
    the step, so it may last longer still."""
    used, plain = 0, batch.n
    offers = _offers(generating, budget)
    # Whose wait is bounded: interactive requests' streams (a batch line has no one
    # watching it), with the tokens each expects from the step; the `n` choices of one
    # request share its cancellation event, and count as the least of theirs.
    gains: dict[int, float] = {}
    wanting: set[int] = set()  # slots whose drafts would pay
    for slot in generating:
        job = slot.job
        assert job is not None
        offer = offers.get(slot.seq_id)
        gain = job.pace.expected(plain, len(offer[1])) \
            if offer and job.pace is not None else 1.0
        if gain > 1.0:
            wanting.add(slot.seq_id)
        if job.request.priority > BATCH_PRIORITY:
            key = id(job.request.cancelled)
            gains[key] = min(gains.get(key, gain), gain)
    left = len(wanting)
    for slot in generating:
        job = slot.job
        assert job is not None
        source, pace = job.drafts_from, job.pace
        if pace is None or source is None:
            continue
        at, offer = offers.get(slot.seq_id, (-1, ()))
        room = min(budget, pace.most) - used
        if slot.seq_id in wanting:
            room //= left  # the first stream must not take it all
            left -= 1
        offered = offer[:max(0, room)]
        if offered:
            # Priced only for an offer: most steps of a prediction offer none.
            own = id(job.request.cancelled)
            others = [gain for key, gain in gains.items() if key != own]
            cap = room_beside_others(pace.costs, plain, used, max_slowdown * min(others),
                                     len(offered)) if others else None
            length = pace.allowed(batch.n, len(offered), cap)
            job.draft_from, job.draft = at, offered[:length]
            job.draft_index = batch.n
            for j, token in enumerate(job.draft):
                batch.add(token, slot.n_past + 1 + j, slot.seq_id, True)
            used += len(job.draft)
        if pace.watching and offer and not job.draft:
            job.guess, job.guess_after = offer[0], len(job.tokens)
        pace.step()
    return used


def _offers(generating: list[Slot], budget: int) -> dict[int, tuple[int, tuple[int, ...]]]:
    """What each drafting slot's source offers to follow its next token, by seq_id: at most
    `budget` tokens, and never past the answer's max_tokens (a draft there could never be
    kept). A lookup's last guess is scored first."""
    offers: dict[int, tuple[int, tuple[int, ...]]] = {}
    for slot in generating:
        job = slot.job
        assert job is not None
        job.draft = ()
        source, pace = job.drafts_from, job.pace
        if pace is None or source is None:
            continue
        if pace.watching:
            _check_guess(job, pace)
        room = min(budget, pace.most, job.max_new - job.n_generated - 1)
        offers[slot.seq_id] = source.draft(job.tokens, job.draft_cursor, room,
                                           pace.least_match)
    return offers


def _check_guess(job: Job, pace: DraftPace) -> None:
    """Score the guess of the token written since the last step, if one was left undrafted
    (a drafted one is scored by take_draft)."""
    if job.guess >= 0 and len(job.tokens) == job.guess_after + 1:
        pace.observed(job.tokens[-1] == job.guess)
    job.guess = -1


def room_beside_others(costs: StepCosts, plain: int, drafted: int, max_slowdown: float,
                       most: int) -> int:
    """How many more drafts (at most `most`) a step of `plain` generating positions, with
    `drafted` drafts in it already, may take and last at most `max_slowdown` times as long
    as with none. A draft pays for the step as a whole (server/engine/prediction.py's
    best_length), but another client's stream only waits longer for its next token: its
    wait is bounded."""
    limit = costs.of(plain) * max_slowdown
    more = 0
    while more < most and costs.of(plain + drafted + more + 1) <= limit:
        more += 1
    return more


def count_drafted(job: Job) -> None:
    """Before the step's first sample of `job`, which may end it (its usage is then sent):
    the whole draft as taken back, until take_draft keeps some of it."""
    _tally(job, 0, len(job.draft))


def _tally(job: Job, kept: int, refused: int) -> None:
    """Count drafted tokens as the client's prediction's (usage reports them) or as prompt
    lookup's (the server's own business: timings and metrics only)."""
    timer = job.request.timer
    if job.request.predicted is not None:
        timer.accepted_prediction_tokens += kept
        timer.rejected_prediction_tokens += refused
    else:
        timer.accepted_lookup_tokens += kept
        timer.rejected_lookup_tokens += refused


def take_draft(slot: Slot, job: Job, sample: Callable[[int], None],
               memory: llama_cpp.llama_memory_t) -> None:
    """Keep the step's drafted tokens for as long as the sampler, run at each one's position
    in turn (`sample(batch_index)`), picks exactly it: each kept one is in the KV cache
    already, and the logits after it are the next position's. Take the rest back out."""
    draft, kept = job.draft, 0
    job.draft = ()
    for j, token in enumerate(draft):
        if slot.job is not job or job.next_token != token:
            break  # the job ended, or the model wrote something else here
        slot.cached.append(token)
        slot.n_past += 1
        kept += 1
        _tally(job, 1, -1)  # before the sample that may end the job
        sample(job.draft_index + j)
    job.draft_cursor = job.draft_from + kept
    if job.pace is not None:
        job.pace.checked(len(draft), kept)
    if kept < len(draft):
        llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, slot.n_past, -1)
