"""How deeply a JSON text nests arrays and objects, and how many it holds, without parsing.

Only the bytes that shape JSON matter here (quotes, backslashes, brackets): numpy finds
where they are in a few vectorized passes, and the work after that grows with their number,
not with the body's size. A 45 MB string costs tens of milliseconds and no
Python object per value, so the check is cheap enough to run before the real parser (which
holds the interpreter for as long as it takes to build every value).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

_QUOTE, _BACKSLASH, _OPEN, _CLOSE = 1, 2, 3, 4
_MARKS = bytearray(256)
_MARKS[ord('"')] = _QUOTE
_MARKS[ord("\\")] = _BACKSLASH
_MARKS[ord("[")] = _MARKS[ord("{")] = _OPEN
_MARKS[ord("]")] = _MARKS[ord("}")] = _CLOSE
_KIND = np.frombuffer(bytes(_MARKS), dtype=np.uint8)
_CHUNK = 1 << 20  # bytes per numpy pass: bounds the temporary arrays to a few MB


class JsonShape(NamedTuple):
    depth: int  # deepest nesting of `[` / `{` (0 for a scalar)
    containers: int  # arrays and objects in all


def json_depth(text: bytes) -> int:
    return json_shape(text).depth


def json_shape(text: bytes, max_containers: int | None = None) -> JsonShape:
    """Malformed JSON gets some numbers; the parser that runs afterwards rejects it anyway.
    (Valid JSON has backslashes only inside strings, so escapes are read right.) Past
    `max_containers` it stops counting: the answer is then a lower bound."""
    level = deepest = containers = 0
    inside = 0  # 1 while within a string at the chunk's start
    start = 0
    while start < len(text):
        end = min(start + _CHUNK, len(text))
        while end < len(text) and text[end - 1] == 0x5C:  # keep a backslash run whole
            end += 1
        chunk = np.frombuffer(text, dtype=np.uint8, count=end - start, offset=start)
        start = end
        folded = chunk | 0x20  # "[" and "]" fold onto "{" and "}"
        marked = (chunk == 0x22) | (chunk == 0x5C) | (folded == 0x7B) | (folded == 0x7D)
        if not marked.any():
            continue
        pos = np.flatnonzero(marked)
        kind = _KIND[chunk[pos]]
        follows = np.zeros(pos.size, dtype=bool)  # directly after the previous mark
        follows[1:] = pos[1:] == pos[:-1] + 1
        backslash = kind == _BACKSLASH
        # Length of the backslash run ending at each mark (meaningful for backslashes).
        continues = np.zeros(pos.size, dtype=bool)
        continues[1:] = backslash[1:] & backslash[:-1] & follows[1:]
        index = np.arange(pos.size)
        run_start = np.maximum.accumulate(np.where(backslash & ~continues, index, 0))
        odd_run = (index - run_start) % 2 == 0  # run length index - run_start + 1 is odd
        escaped = np.zeros(pos.size, dtype=bool)
        escaped[1:] = backslash[:-1] & follows[1:] & odd_run[:-1]
        quote = (kind == _QUOTE) & ~escaped
        in_string = (np.cumsum(quote) + inside) % 2 == 1
        outside = ~in_string & ~quote
        opens = (kind == _OPEN) & outside
        steps = opens.astype(np.int64) - ((kind == _CLOSE) & outside)
        levels = np.cumsum(steps) + level
        deepest = max(deepest, int(levels.max()))
        level = int(levels[-1])
        containers += int(np.count_nonzero(opens))
        if max_containers is not None and containers > max_containers:
            break
        inside = int(in_string[-1])  # the quotes so far, the last one included
    return JsonShape(deepest, containers)
