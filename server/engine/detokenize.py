"""Token bytes → text, incrementally: never split a UTF-8 character, hold back stop strings."""

from __future__ import annotations

import codecs


class TextStream:
    """Feeds token bytes in, returns the text that is safe to send so far.

    Text that could be the start of a stop string is held back until it is known not
    to be one; when a stop string appears, everything from it on is dropped.
    """

    __slots__ = ("_decoder", "_held", "_max_stop", "_stops", "stopped")

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stops if s)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.stopped = False

    @property
    def stops(self) -> tuple[str, ...]:
        return self._stops

    def push(self, piece: bytes) -> str:
        text = self._decoder.decode(piece)
        if not self._stops:
            return text
        return self._scan(self._held + text)

    def finish(self) -> str:
        """Flush at the end of generation (an unfinished UTF-8 sequence becomes U+FFFD)."""
        text = self._decoder.decode(b"", final=True)
        if not self._stops:
            return text
        out = self._scan(self._held + text)
        if self.stopped:
            return out
        held, self._held = self._held, ""
        return out + held

    def _scan(self, text: str) -> str:
        if self.stopped:
            return ""
        cut = _first_stop(text, self._stops)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = _longest_stop_prefix_suffix(text, self._stops, self._max_stop)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]


def before_stop(text: str, stops: tuple[str, ...]) -> str:
    """`text` up to its first stop string (all of it without one)."""
    cut = _first_stop(text, stops)
    return text if cut < 0 else text[:cut]


def _first_stop(text: str, stops: tuple[str, ...]) -> int:
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...], max_len: int) -> int:
    """Length of the longest end of `text` that is a proper prefix of some stop string."""
    for n in range(min(len(text), max_len - 1), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0
