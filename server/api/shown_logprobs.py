"""Token logprobs of an answer with tool calls parsed out of it: the tokens of the text the
client is shown (its `content`, the Responses `output_text`), not those of the call markup,
whole (a finished answer) or streamed (each token's logprob with the text that shows it).

The rule, the same both ways: a token is the content's when more than half of its characters
are shown text (a token straddling the end of the text and the call marker goes where most of
it lies); a token with no text of its own (part of a character, text held back for a stop
string) goes with the character after it (at the answer's end, with that end).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.engine import TokenEvent
from server.engine.logprobs import TokenLogprob
from server.engine.tools import TextDelta

Span = tuple[int, int]  # [start, end) in the raw answer text


def shown_logprobs(logprobs: Sequence[dict[str, object]], spans: Sequence[Span],
                   shown: Sequence[Span], length: int) -> list[dict[str, object]]:
    """The entries of the tokens (at `spans`) that the shown text (at `shown`) is mostly,
    in an answer of `length` characters."""
    # With no character after it, a token goes with the answer's end: shown if the shown
    # text reaches it (an empty answer's too).
    end_shown = max((b for _, b in shown), default=0) == length
    return [entry for entry, (start, end) in zip(logprobs, spans, strict=True)
            if _mostly_shown(start, end, shown) or (start == end == length and end_shown)]


def _mostly_shown(start: int, end: int, shown: Sequence[Span]) -> bool:
    if start == end:
        return any(a <= start < b for a, b in shown)
    visible = sum(max(0, min(end, b) - max(start, a)) for a, b in shown)
    return 2 * visible > end - start


@dataclass
class _Token:
    start: int
    end: int
    logprob: TokenLogprob
    shown: int = 0  # characters passed on as text so far


class StreamedLogprobs:
    """A tool-call stream's logprobs: each token's goes out once, on the text piece that
    makes it mostly shown; a token whose text turned out to be markup gets none."""

    def __init__(self) -> None:
        self._pending: list[_Token] = []  # undecided, in answer order
        self._fed = 0
        self._shown_to = 0  # where the text shown so far ends in the raw answer

    def token(self, text: str, logprob: TokenLogprob | None) -> None:
        """The engine's next token (its text goes to the parser next)."""
        if logprob is not None:
            self._pending.append(_Token(self._fed, self._fed + len(text), logprob))
        self._fed += len(text)

    def text(self, delta: TextDelta) -> list[TokenEvent]:
        """The shown text as events, cut where undecided tokens begin and end so that each
        logprob rides with its own token's text."""
        start, end = delta.start, delta.start + len(delta.text)
        self._shown_to = max(self._shown_to, end)
        events: list[TokenEvent] = []
        at = start
        for token in list(self._pending):
            # A token with no text belongs to the piece that holds the character after it.
            if token.start >= end or max(token.end, token.start + 1) <= start:
                continue
            low, high = max(start, token.start), min(end, token.end)
            if low > at:
                events.append(TokenEvent(delta.text[at - start:low - start]))
            token.shown += high - low
            piece = delta.text[low - start:high - start]
            if token.start == token.end or 2 * token.shown > token.end - token.start:
                events.append(TokenEvent(piece, token.logprob))
                self._pending.remove(token)
            elif piece:
                events.append(TokenEvent(piece))
            at = high
        if at < end:
            events.append(TokenEvent(delta.text[at - start:]))
        return events

    def settle(self, consumed: int) -> None:
        """Forget the tokens the parser has settled (`consumed` characters) without showing
        them mostly: markup's."""
        self._pending = [t for t in self._pending if max(t.end, t.start + 1) > consumed]

    def rest(self) -> list[TokenEvent]:
        """The end of the answer: the tokens with no character after them, when the shown
        text reaches it (as without tools); the others undecided were never shown."""
        events = [TokenEvent("", t.logprob) for t in self._pending
                  if t.start == t.end == self._fed == self._shown_to]
        self._pending = []
        return events
