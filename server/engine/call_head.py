"""The head of a call in the tool-call markup: what follows the marker up to where the
arguments' JSON starts, `{"name": "get_weather", "arguments": `.

Matched whole, it names the call; while it is still being written, `could_begin_head` tells
a head cut short (an answer stopped by max_tokens before the name was complete: markup) from
text that can no longer become one (a marker written as mere text, which only an answer
without the tool grammar can hold).
"""

from __future__ import annotations

import json
import re

# What the grammar makes a call begin with, up to where the arguments' JSON starts.
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')

_WS, _NAME = object(), object()
# The same head as steps, to follow one that is not finished yet.
_STEPS: tuple[object, ...] = (_WS, "{", _WS, '"name"', _WS, ":", _WS, _NAME, _WS, ",", _WS,
                              '"arguments"', _WS, ":")


def match_head(text: str) -> tuple[str, int] | None:
    """The called function's name and where the head ends in `text`; None: no whole head."""
    match = _CALL_HEAD.match(text)
    if match is None:
        return None
    return json.loads(f'"{match.group(1)}"'), match.end()


def could_begin_head(text: str) -> bool:
    """Whether `text` is the beginning of a head (or a whole one): more text may still make
    it a call."""
    at = 0
    for step in _STEPS:
        if step is _WS:
            while at < len(text) and text[at].isspace():
                at += 1
        elif step is _NAME:
            if at < len(text) and text[at] != '"':
                return False
            at = _string_end(text, at + 1)
        else:
            assert isinstance(step, str)
            part = text[at:at + len(step)]
            if not step.startswith(part):
                return False
            at += len(part)
        if at >= len(text):
            return True
    return True


def _string_end(text: str, at: int) -> int:
    """Where a JSON string whose contents start at `at` ends (past its closing quote), or
    len(text) if it does not end in `text`."""
    while at < len(text):
        if text[at] == "\\":
            at += 2
        elif text[at] == '"':
            return at + 1
        else:
            at += 1
    return len(text)
