"""How deeply a JSON text nests arrays and objects, without parsing it.

Strings are cut out with one regex pass, everything but brackets with bytes.translate, and
the running depth is a cumulative sum in numpy: a 50 MB body costs milliseconds and no
Python object per value, so the check is cheap enough to run before the real parser.
"""

from __future__ import annotations

import re

import numpy as np

try:  # possessive (Python 3.11+): an unterminated string fails at once, no backtracking
    _STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
except re.error:
    _STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPENS = np.zeros(256, dtype=bool)
_OPENS[[ord("["), ord("{")]] = True
_CHUNK = 1 << 20  # brackets per numpy pass: bounds the temporary arrays to a few MB


def json_depth(text: bytes) -> int:
    """The deepest nesting of `[` / `{` (0 for a scalar). Malformed JSON gets some number;
    the parser that runs afterwards rejects it anyway."""
    brackets = _STRING.sub(b"", text).translate(None, _NOT_BRACKETS)
    level = deepest = 0
    for start in range(0, len(brackets), _CHUNK):
        chunk = np.frombuffer(brackets, dtype=np.uint8, offset=start,
                              count=min(_CHUNK, len(brackets) - start))
        levels = np.cumsum(np.where(_OPENS[chunk], 1, -1), dtype=np.int64) + level
        deepest = max(deepest, int(levels.max()))
        level = int(levels[-1])
    return deepest
