"""Responses `truncation: "auto"`: a conversation that outgrew the context loses its oldest
turns instead of failing.

An agent continuing with `previous_response_id` grows its conversation every turn; once it
is longer than the context (or holds more images than a request may) every request is a
400 and the app is stuck. With "auto" the
oldest turns go (whole: the conversation is cut just before a user turn, so no answer or
tool result is left without what it answered), the system turns (instructions, the tool
prompt) stay, and the newest user turn always stays. The prompt is counted as the engine
will read it (template, images), a binary search over the cut points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.api.errors import APIError
from server.api.protocol import ChatMessageIn, FilePart, ImagePart
from server.api.state import AppState
from server.engine import ChatMessage, ErrorEvent, GenerationRequest


@dataclass(frozen=True)
class Fitted:
    messages: list[ChatMessage]
    first_kept: int | None  # index of the first message kept after the cut; None: no cut
    fixed: int  # the leading system messages, kept whatever was cut


async def fit_conversation(state: AppState, messages: list[ChatMessage],
                           user_turns: Sequence[bool], generation: GenerationRequest
                           ) -> Fitted:
    """The messages with the fewest oldest turns dropped so that the prompt leaves the
    answer its max_tokens (at most half the context). `user_turns[i]`: message i is a
    user's own turn (not a tool result), so the conversation may start there."""
    n_ctx = state.engine.info["n_ctx"]
    budget = n_ctx - 1 - min(generation.max_tokens, n_ctx // 2)
    fixed = 0
    while fixed < len(messages) and messages[fixed].role == "system":
        fixed += 1

    async def fits(cut: int) -> bool:
        request = GenerationRequest(messages=messages[:fixed] + messages[cut:], max_tokens=1,
                                    client=generation.client,
                                    template_kwargs=generation.template_kwargs)
        counted = await state.engine.tokenize(request)
        if isinstance(counted, ErrorEvent):
            if counted.code == "context_length_exceeded":  # too long to be worth counting
                return False
            raise APIError(counted.status, counted.message, code=counted.code)
        return counted.count <= budget

    if await fits(fixed):
        return Fitted(messages, None, fixed)
    cuts = [i for i in range(fixed + 1, len(messages)) if user_turns[i]]
    if not cuts:
        return Fitted(messages, None, fixed)  # nothing to drop: the engine says it is too long
    low, high = 0, len(cuts) - 1  # the last cut keeps only the newest user turn on
    while low < high:
        middle = (low + high) // 2
        if await fits(cuts[middle]):
            high = middle
        else:
            low = middle + 1
    cut = cuts[low]
    return Fitted(messages[:fixed] + messages[cut:], cut, fixed)


def image_cut(messages: Sequence[ChatMessageIn], user_turns: Sequence[bool], limit: int
              ) -> tuple[int, int] | None:
    """Where to cut so that at most `limit` images are left: (the leading system messages,
    kept; the first message kept after them). An image chat reaches max_images_per_request
    long before its context is full. None: they are allowed as they are, or no whole turn
    can go."""
    per = [sum(isinstance(part, ImagePart | FilePart) for part in m.content)
           if isinstance(m.content, list) else 0 for m in messages]
    if sum(per) <= limit:
        return None
    fixed = 0
    while fixed < len(messages) and messages[fixed].role in ("system", "developer"):
        fixed += 1
    left = sum(per)
    for index in range(fixed + 1, len(messages)):
        left -= per[index - 1]
        if user_turns[index] and left <= limit:
            return fixed, index
    return None
