"""Rendered prompt → the parts mtmd tokenizes: plain text, special tokens, images.

Only the chat template's own markup may yield special tokens: a client's text is one plain
part with special-token parsing off, so `</s>` typed by a user is four characters, not the
end of the turn — and tokenizing it stays linear (llama.cpp's special-token pass is
quadratic in the number of matches). Plain text between two special tokens or images is
one part, as when the whole prompt is tokenized at once: SentencePiece's leading space and
BPE merges come out the same.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from server.engine.prompt import RenderedPrompt
from server.engine.types import ImageInput


@dataclass(frozen=True)
class Special:
    """The text of one special token, to be tokenized with special parsing on."""

    text: str


Part = str | Special | ImageInput  # str: plain text, never parsed for special tokens


class MarkupSplitter:
    def __init__(self, special_texts: Iterable[str], media_marker: str) -> None:
        self._marker = media_marker
        # Longest first, as llama.cpp matches them; the marker takes precedence over all.
        alternatives = sorted({t for t in special_texts if t}, key=len, reverse=True)
        self._pattern = re.compile("|".join(
            re.escape(t) for t in [media_marker, *alternatives]))
        self._split_markup = lru_cache(maxsize=256)(self._split_uncached)

    def parts(self, rendered: RenderedPrompt) -> list[Part]:
        out: list[Part] = []
        plain: list[str] = []
        images = iter(rendered.images)
        for segment in rendered.segments:
            if segment.user:
                plain.append(segment.text)
                continue
            for piece in self._split_markup(segment.text):
                part = next(images, None) if isinstance(piece, Special) \
                    and piece.text == self._marker else piece
                if part is None or isinstance(part, str):
                    # A marker with no image left: text a raw prompt spelled, not a slot.
                    plain.append(piece if isinstance(piece, str) else piece.text)
                    continue
                if plain:
                    out.append("".join(plain))
                    plain = []
                out.append(part)
        if plain:
            out.append("".join(plain))
        return out

    def _split_uncached(self, markup: str) -> tuple[str | Special, ...]:
        """Markup repeats once per message: each distinct string is split once."""
        pieces: list[str | Special] = []
        start = 0
        for match in self._pattern.finditer(markup):
            if match.start() > start:
                pieces.append(markup[start:match.start()])
            pieces.append(Special(match.group()))
            start = match.end()
        if start < len(markup):
            pieces.append(markup[start:])
        return tuple(pieces)
