"""What a sampled token does to its job: text for the client (streamed, held for a
non-streaming answer, or with logprobs), and the end of the answer when it is done.
Engine thread only."""

from __future__ import annotations

from server.engine.detokenize import before_stop
from server.engine.jobs import NextTurn, Slot, finish_job
from server.engine.logprobs import token_logprob
from server.engine.model import LoadedModel
from server.engine.next_turn import guess
from server.engine.types import TokenEvent


def take_token(slot: Slot, token: int, batch_index: int, model: LoadedModel,
               next_turn_markup: tuple[int, ...]) -> None:
    """Give the slot's job the token it sampled at `batch_index` of the step."""
    job = slot.job
    assert job is not None
    if not job.saw_first_token:
        job.saw_first_token = True
        job.request.timer.mark_since_start("first_token")
    if token in model.eog_tokens:
        finish(slot, "stop", model, next_turn_markup, last=None)
        return
    piece = model.pieces[token]
    first = job.n_generated == 0
    # A raw completion continues its prompt's text: its first word keeps its space.
    if first and model.strip_first_space and piece.startswith(b" ") and not job.request.raw:
        piece = piece[1:]
    job.n_generated += 1
    text = job.text.push(piece)
    top_k = job.request.top_logprobs
    if top_k is not None:
        job.sink.put(TokenEvent(text, token_logprob(model.ctx, batch_index, model.n_vocab,
                                                    token, top_k, model.pieces),
                                job.prompt_logprobs if first else None))
    elif job.held_text is not None:
        job.held_text.append(text)
    elif text:
        job.sink.put(TokenEvent(text))
    if job.text.stopped:
        finish(slot, "stop", model, next_turn_markup, last=token, cut_by_stop=True)
    elif job.n_generated >= job.max_new or slot.n_past >= model.n_ctx:
        finish(slot, "length", model, next_turn_markup, last=token)
    else:
        job.next_token = token
        job.tokens.append(token)


def finish(slot: Slot, reason: str, model: LoadedModel, markup: tuple[int, ...], *,
           last: int | None, cut_by_stop: bool = False) -> None:
    """End the job for its own reason; with `markup` (the feature on), leave the slot what
    the conversation's next turn may start with (server/engine/next_turn.py). `last`: the
    final sampled token, never decoded (None: the end-of-turn token)."""
    job = slot.job
    assert job is not None
    finish_job(slot, reason)
    if not markup or job.request.priority < 0 or job.request.raw:
        return  # chats only: a batch line or a raw completion has no next turn
    ids = [*job.tokens, *(() if last is None else (last,))]
    raw = b"".join(model.pieces[t] for t in ids)
    if model.strip_first_space and raw.startswith(b" "):
        raw = raw[1:]
    answer = raw.decode("utf-8", errors="replace")  # as the client's TextStream decoded it
    if cut_by_stop:
        answer = before_stop(answer, job.text.stops)
    slot.next_turn = NextTurn(
        # Cut by a stop string, the slot holds stop text no prompt will: no plain guess.
        guess=[] if cut_by_stop else guess(markup, last),
        messages=job.request.messages, answer=answer, generated=len(job.tokens))
