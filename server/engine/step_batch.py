"""One decode step's batch: every generating slot's next token, then prompt text of the
slots still prefilling, as far as the batch and the free KV cells allow (a long prompt is
spread over steps instead of stalling the other streams). Engine thread only."""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.batch import TokenBatch
from server.engine.drafts import add_drafts
from server.engine.jobs import PrefillItem, Slot
from server.engine.prompt_scores import ROWS_PER_STEP


@dataclass
class Prefilled:
    """Prompt text of one slot in this step's batch."""

    slot: Slot
    item: PrefillItem
    n: int
    last_index: int  # batch index of the prompt's last token, or -1
    first_index: int  # batch index of the first of the `n` tokens


def fill_step(batch: TokenBatch, slots: list[Slot], free_cells: int, max_slowdown: float
              ) -> tuple[list[Slot], list[Prefilled]]:
    """Fill `batch`: the generating slots (in order: slot i's token is at index i), their
    predicted drafts (slowing the step at most `max_slowdown` times beside another
    request's stream), and the prompt text it took."""
    batch.clear()
    generating = [s for s in slots if s.job is not None and s.job.next_token >= 0]
    drafting = False
    for slot in generating:
        batch.add(slot.job.next_token, slot.n_past, slot.seq_id, True)  # type: ignore[union-attr]
        drafting = drafting or slot.job.pace is not None  # type: ignore[union-attr]
    room = free_cells - len(generating)
    if drafting:
        room -= add_drafts(batch, generating, min(batch.capacity - batch.n, room),
                           max_slowdown)
    return generating, _add_prompt_tokens(batch, slots, min(batch.capacity - batch.n, room))


def _add_prompt_tokens(batch: TokenBatch, slots: list[Slot], budget: int) -> list[Prefilled]:
    """Fill `budget` tokens of the batch with prompt text of prefilling slots."""
    prefilled: list[Prefilled] = []
    rows = ROWS_PER_STEP  # logit rows for prompts being scored, all of them together
    for slot in slots:
        job = slot.job
        if budget <= 0:
            break
        if job is None or not job.work or job.work[0].chunk.image is not None:
            continue
        item = job.work[0]
        tokens = item.chunk.tokens
        n = min(budget, len(tokens) - item.start)
        scoring = job.prompt_logprobs is not None  # every token's logits kept
        if scoring:
            n = min(n, rows)
            rows -= n
            if n == 0:
                continue
        ends_prompt = item.start + n == len(tokens) and len(job.work) == 1
        first = batch.n
        for j in range(n):
            batch.add(tokens[item.start + j], slot.n_past + j, slot.seq_id,
                      scoring or (ends_prompt and j == n - 1))
        prefilled.append(Prefilled(slot, item, n, batch.n - 1 if ends_prompt else -1, first))
        budget -= n
    return prefilled
