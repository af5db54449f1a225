"""What the slot loop works on: a request's running state (Job), the slot that holds it,
and the prompt (plus, on resume, generated) tokens still to evaluate."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from server.engine import mtmd
from server.engine.admission import Sink
from server.engine.detokenize import TextStream
from server.engine.embed_cache import EmbedKey
from server.engine.logprobs import PromptLogprobs
from server.engine.lookup import ContextLookup
from server.engine.prediction import DraftPace, Prediction
from server.engine.prefix import KvEntries, KvKey
from server.engine.sampling import TokenSampler
from server.engine.types import (
    ChatMessage,
    DoneEvent,
    EngineEvent,
    GenerationRequest,
    TokenEvent,
)

# What a job drafts from: a client's prediction, shared by its choices, or its own lookup.
DraftSource = Prediction | ContextLookup


@dataclass
class PrefillItem:
    """A prompt chunk still to evaluate; for text, `start` is the first token not yet in KV."""

    chunk: mtmd.PromptChunk
    start: int = 0
    embed_key: EmbedKey | None = None


@dataclass
class Job:
    request: GenerationRequest
    sink: Sink
    # Kept across a preemption, never rebuilt: it holds the grammar's and penalties' state.
    sampler: TokenSampler
    text: TextStream
    max_new: int
    # Open until the job ends (not just until prefill): a preempted job re-evaluates it.
    prompt: mtmd.TokenizedPrompt
    work: deque[PrefillItem]
    deadline: float
    order: int  # admission sequence, kept across preemptions: the newest is preempted first
    prompt_done_at: float = 0.0
    n_generated: int = 0
    next_token: int = -1  # sampled, to be fed to the next decode step
    # Every sampled token that continues the answer (the last is `next_token` while it
    # waits for its decode): what a resumed job re-evaluates after its prompt.
    tokens: list[int] = field(default_factory=list)
    preemptions: int = 0
    saw_first_token: bool = False
    held_text: list[str] | None = None  # non-streaming: the answer, sent whole at the end
    # `n > 1`: the other choices, seated beside this one, which start from a copy of its
    # KV once its prompt is evaluated (and sample from the same logits) instead of
    # evaluating the prompt themselves.
    siblings: list[Job] = field(default_factory=list)
    awaits_copy: bool = False  # a sibling still waiting for that copy
    prompt_logprobs: PromptLogprobs | None = None  # server/engine/prompt_scores.py
    # Predicted tokens in this step's batch after `next_token` (server/engine/prediction.py):
    # the first at batch index `draft_index`, taken from the prediction at `draft_from`.
    draft: tuple[int, ...] = ()
    draft_index: int = 0
    draft_from: int = 0
    # Where the answer last followed the prediction (its next token's position there).
    draft_cursor: int = 0
    # The client's prediction, or the request's own text (prompt lookup); None: no drafts.
    drafts_from: DraftSource | None = None
    pace: DraftPace | None = None  # None: no drafts
    # A lookup's guess of `tokens[guess_after]` that was not drafted, checked once that
    # token is written (DraftPace.observed); -1: none.
    guess: int = -1
    guess_after: int = 0

    def keys(self) -> list[KvKey]:
        """What this job's sequence holds once its prompt and its tokens are evaluated."""
        return [*self.prompt.keys(), *self.tokens]

    def cells_needed(self) -> int:
        """KV cells the job fills when (re)started, plus one for its next token."""
        return self.prompt.n_tokens + len(self.tokens) + 1


@dataclass
class NextTurn:
    """What an answer's idle slot may evaluate for the conversation's next turn."""

    guess: list[int]  # the plain guess: undecoded last token and markup (may be empty)
    messages: list[ChatMessage]  # the conversation the answer replied to
    answer: str  # the answer as its client got it
    generated: int  # the answer's tokens in the slot's KV


@dataclass
class Slot:
    seq_id: int
    cached: KvEntries = field(default_factory=KvEntries)  # what this sequence's KV holds
    # Whose data `cached` is: only that tenant may reuse it. The warm-up's prefix counts as
    # the keyless tenant's (""): with keys on, probing it could spell out the operator's
    # system prompt.
    tenant: str = ""
    n_past: int = 0  # KV positions used by this sequence
    job: Job | None = None
    # Tokens to evaluate into this idle slot when the engine has nothing else to do: the
    # start of its conversation's next turn (server/engine/next_turn.py). Any change to
    # the slot's KV drops them.
    next_turn: NextTurn | None = None
    # When its last job ended (time.monotonic()): how recently its conversation was used,
    # against the copies in the RAM cache (RamPrefixCache.save_ahead).
    idle_since: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.cached, KvEntries):
            self.cached = KvEntries(self.cached)


def remaining_work(chunks: list[mtmd.PromptChunk], keep: int, tenant: str
                   ) -> deque[PrefillItem]:
    """The chunks after the first `keep` KV entries, as prefill work; images are looked up
    in `tenant`'s part of the embedding cache."""
    work: deque[PrefillItem] = deque()
    index = 0
    seen: dict[str, int] = {}
    for chunk in chunks:
        if chunk.image is None:
            skip = max(0, keep - index)
            index += len(chunk.tokens)
            if skip < len(chunk.tokens):
                work.append(PrefillItem(chunk, start=skip))
            continue
        ordinal = seen.get(chunk.image.content_hash, 0)
        seen[chunk.image.content_hash] = ordinal + 1
        index += 1
        if index > keep:
            work.append(PrefillItem(chunk, embed_key=(tenant, chunk.image.content_hash,
                                                      ordinal)))
    return work


def resume_chunks(job: Job) -> list[mtmd.PromptChunk]:
    """The prompt's chunks, then the job's generated tokens as one more text chunk."""
    chunks = list(job.prompt.chunks)
    if job.tokens:
        tokens = tuple(job.tokens)
        chunks.append(mtmd.PromptChunk(tokens=tokens, image=None, n_tokens=len(tokens),
                                       handle=0))
    return chunks


def finish_job(slot: Slot, reason: str) -> None:
    """End the slot's job for its own reason: flush held text, close the timer."""
    job = slot.job
    assert job is not None
    text = job.text.finish()
    if job.held_text is not None:
        text = "".join(job.held_text) + text
    if text:
        job.sink.put(TokenEvent(text))
    timer = job.request.timer
    timer.completion_tokens = job.n_generated
    if job.prompt_done_at:
        timer.add("generation", time.perf_counter() - job.prompt_done_at)
    timer.mark_since_start("total")
    end_job(slot, DoneEvent(reason, timer, job.prompt_logprobs))  # type: ignore[arg-type]


def end_job(slot: Slot, event: EngineEvent) -> None:
    """Free the job's sampler and prompt, empty the slot, then tell the handler."""
    job = slot.job
    assert job is not None
    job.sampler.free()
    job.prompt.close()
    slot.job = None
    slot.idle_since = time.monotonic()
    job.sink.put(event)


def slot_view(slot: Slot) -> dict[str, object]:
    """What /slots shows of a slot (the API layer hides other clients' details)."""
    job = slot.job
    return {
        "id": slot.seq_id,
        "state": "idle" if job is None else "prefill" if job.work else "generating",
        "request_id": job.request.request_id if job else None,
        "client": job.request.client if job else None,
        "n_past": slot.n_past,
        "generated_tokens": job.n_generated if job else 0,
    }
