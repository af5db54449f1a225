"""Reads a state snapshot (server.store.snapshot) one record at a time: the file is parsed
as it is read, so a start holds one record's JSON beside the restored tables, not the
whole file's text and its parsed copy as well. Any JSON layout of the same object is
read (an edited file's spacing too); a file cut short or not JSON raises ValueError."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, TextIO

_DECODER = json.JSONDecoder()
_SPACE = " \t\n\r"
_AFTER = _SPACE + ",]}:"  # what may follow a whole value
_CHUNK = 1 << 16


class _Stream:
    """A text file read in chunks; the parsed part of the buffer is dropped as it goes."""

    def __init__(self, file: TextIO) -> None:
        self.file = file
        self.buf = ""
        self.pos = 0
        self.eof = False

    def _more(self, at_least: int) -> bool:
        """Read on (at least as much again as what is pending, so a long record is parsed
        a few times, not once per chunk); False at the end of the file."""
        if self.eof:
            return False
        data = self.file.read(max(_CHUNK, at_least))
        if not data:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + data
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next character that is not white space ("" at the end)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _SPACE:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more(0):
                return ""

    def take(self) -> str:
        char = self.peek()
        if not char:
            raise ValueError("the snapshot ends early")
        self.pos += 1
        return char

    def expect(self, char: str) -> None:
        if self.take() != char:
            raise ValueError(f"expected {char!r} in the snapshot")

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if not self._more(len(self.buf) - self.pos):
                    raise
                continue
            # A number the chunk cut ("12" of "12.5", "1" of "1e3") reads as a shorter
            # one: whole only when what follows it may follow a value.
            if (end < len(self.buf) and self.buf[end] in _AFTER) or not self._more(0):
                self.pos = end
                return value


def _members(stream: _Stream, close: str) -> Iterator[None]:
    """Step through an object's or array's members (its opening already read): yields
    once before each, with the stream at it."""
    if stream.peek() == close:
        stream.pos += 1
        return
    while True:
        yield
        char = stream.take()
        if char == close:
            return
        if char != ",":
            raise ValueError(f"expected ',' or {close!r} in the snapshot")


def _key(stream: _Stream) -> str:
    key = stream.value()
    if not isinstance(key, str):
        raise ValueError("an object key that is no string")
    stream.expect(":")
    return key


def records(file: TextIO, fields: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(table name, record) for each record under the snapshot's `tables`, in file order;
    each other top-level field goes into `fields` as it is read (the writer puts them
    first). A `tables` member that is no list is read and passed over."""
    stream = _Stream(file)
    stream.expect("{")
    tables = False
    for _ in _members(stream, "}"):
        key = _key(stream)
        if key != "tables":
            fields[key] = stream.value()
            continue
        stream.expect("{")
        tables = True
        for _ in _members(stream, "}"):
            name = _key(stream)
            if stream.peek() != "[":
                stream.value()
                continue
            stream.pos += 1
            for _ in _members(stream, "]"):
                yield name, stream.value()
    if stream.peek():
        raise ValueError("extra data after the snapshot")
    if not tables:
        raise ValueError("no tables")
