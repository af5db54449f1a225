"""A GGUF file's metadata header (scalars and strings), read without loading the model.

The CLI names the served model from it before the engine starts, and `vlserve doctor` asks
which chat template a file would get. gguf's GGUFReader would also do, but it maps every
field and tensor into numpy objects (seconds for a 262k-token vocabulary); this reads the
key/value section only and skips arrays, whose values nobody here needs.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

_MAGIC = b"GGUF"
# GGUF value types: fixed-size scalars by struct format; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 16 << 20  # a chat template is a few KB; anything this large is a broken file


class GGUFMetaError(ValueError):
    """Not a GGUF file, or a truncated or corrupt header."""


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Key → value for every scalar and string field (arrays are left out)."""
    try:
        with Path(path).open("rb") as f:
            return _read(f)
    except struct.error:
        raise GGUFMetaError(f"{path}: the GGUF header is truncated") from None


def _read(f: BinaryIO) -> dict[str, Any]:
    if f.read(4) != _MAGIC:
        raise GGUFMetaError(f"{f.name}: not a GGUF file")
    version, = _unpack(f, "<I")
    if version < 2:
        raise GGUFMetaError(f"{f.name}: GGUF version {version} is not supported")
    _n_tensors, n_kv = _unpack(f, "<QQ")
    out: dict[str, Any] = {}
    for _ in range(n_kv):
        key = _string(f)
        kind, = _unpack(f, "<I")
        if kind == _ARRAY:
            item_kind, count = _unpack(f, "<IQ")
            _skip_array(f, item_kind, count)
        else:
            out[key] = _value(f, kind)
    return out


def _value(f: BinaryIO, kind: int) -> Any:
    if kind == _STRING:
        return _string(f)
    fmt = _SCALARS.get(kind)
    if fmt is None:
        raise GGUFMetaError(f"{f.name}: unknown GGUF value type {kind}")
    return _unpack(f, fmt)[0]


def _skip_array(f: BinaryIO, kind: int, count: int) -> None:
    if kind == _STRING:
        for _ in range(count):
            length, = _unpack(f, "<Q")
            f.seek(length, 1)
    elif kind in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[kind]) * count, 1)
    else:
        raise GGUFMetaError(f"{f.name}: unsupported GGUF array of type {kind}")


def _string(f: BinaryIO) -> str:
    length, = _unpack(f, "<Q")
    if length > _MAX_STRING:
        raise GGUFMetaError(f"{f.name}: a {length}-byte string in the header")
    return f.read(length).decode("utf-8", errors="replace")


def _unpack(f: BinaryIO, fmt: str) -> tuple[Any, ...]:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise struct.error("short read")
    return struct.unpack(fmt, data)
