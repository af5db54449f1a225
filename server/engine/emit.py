"""What a sampled token does to its job: text for the client (streamed, held for a
non-streaming answer, or with logprobs), and the end of the answer when it is done.
Engine thread only."""

from __future__ import annotations

from server.engine.jobs import Slot, finish_job
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
        finish(slot, "stop", guess(next_turn_markup, None))
        return
    piece = model.pieces[token]
    if job.n_generated == 0 and model.strip_first_space and piece.startswith(b" "):
        piece = piece[1:]
    job.n_generated += 1
    text = job.text.push(piece)
    top_k = job.request.top_logprobs
    if top_k is not None:
        job.sink.put(TokenEvent(text, token_logprob(model.ctx, batch_index, model.n_vocab,
                                                    token, top_k, model.pieces)))
    elif job.held_text is not None:
        job.held_text.append(text)
    elif text:
        job.sink.put(TokenEvent(text))
    if job.text.stopped:
        finish(slot, "stop", [])  # cut by a stop string: text the client never sees follows
    elif job.n_generated >= job.max_new or slot.n_past >= model.n_ctx:
        finish(slot, "length", guess(next_turn_markup, token))
    else:
        job.next_token = token
        job.tokens.append(token)


def finish(slot: Slot, reason: str, next_turn: list[int]) -> None:
    """End the job for its own reason; `next_turn`: what the conversation's next turn
    starts with, to evaluate while the engine idles (server/engine/next_turn.py)."""
    job = slot.job
    assert job is not None
    finish_job(slot, reason)
    if next_turn and job.request.priority >= 0:  # chats only: a batch line has no next turn
        slot.next_turn = next_turn
