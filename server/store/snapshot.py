"""The single-box store (`memory://`) kept across a restart: at a graceful stop the stored
responses and conversations are written to `state_snapshot` (one JSON file, readable by the
server's user only) and read back at the next start; the file is deleted once the server
has started, so a crash later cannot bring back what was deleted meanwhile (a crash, or a
second stop signal, loses the tables, as without a snapshot). Entries keep their age: their
TTLs go on counting, and those that ran out while the server was down are dropped."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server.store.memory import MemoryTable
from server.store.table import Codec

logger = logging.getLogger("vlserve.store")

VERSION = 1
Tables = Mapping[str, tuple[MemoryTable[Any], Codec[Any]]]


def save(path: Path, tables: Tables) -> int:
    """Write every live entry of `tables` (their codecs must keep everything in the head:
    JSON records, not pixels); the number of entries written. A write that fails leaves
    no partial file behind."""
    snapshot: dict[str, Any] = {"version": VERSION, "saved_at": time.time(), "tables": {}}
    written = 0
    for name, (table, codec) in tables.items():
        rows = []
        for entry in table.entries():
            head, body = codec.encode(entry.value)
            if body:
                raise ValueError(f"{name}: a snapshot keeps records, not bodies")
            rows.append([entry.owner, entry.key, entry.size, entry.stored_at, head.decode()])
        snapshot["tables"][name] = rows
        written += len(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.unlink(missing_ok=True)  # a stale one: created afresh, so its mode is ours
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # private data
        with os.fdopen(fd, "w") as out:
            json.dump(snapshot, out, separators=(",", ":"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return written


def load(path: Path, tables: Tables) -> tuple[int, int]:
    """Read a snapshot back into `tables` (it stays until `discard`): (entries restored,
    entries skipped: expired, over today's bounds, or unreadable). A file that is no
    snapshot is set aside as `<name>.bad` and the server starts without it."""
    if not path.is_file():
        return 0, 0
    try:
        snapshot = json.loads(path.read_text())
        if not isinstance(snapshot, dict) or snapshot.get("version") != VERSION:
            raise ValueError("not a version-1 snapshot")
        saved = snapshot["tables"]
        if not isinstance(saved, dict):
            raise ValueError("no tables")
    except (OSError, ValueError, KeyError) as exc:
        logger.error("state snapshot %s unreadable (%s): starting without it, kept as %s.bad",
                     path, exc, path.name)
        os.replace(path, path.with_name(path.name + ".bad"))
        return 0, 0
    restored = skipped = 0
    for name, rows in saved.items():
        if name not in tables or not isinstance(rows, list):
            continue
        table, codec = tables[name]
        for row in sorted(rows, key=_stored_at):
            try:
                owner, key, size, stored_at, head = row
                value = codec.decode(head.encode(), b"")
            except Exception as exc:  # a record another version wrote: that one is lost
                logger.warning("state snapshot %s: a %s entry skipped: %r", path, name, exc)
                skipped += 1
                continue
            if table.restore(owner, key, value, size, stored_at):
                restored += 1
            else:
                skipped += 1
    return restored, skipped


def discard(path: Path) -> None:
    """Delete a snapshot once the server has started from it."""
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass  # there was none
    except OSError as exc:
        logger.error("state snapshot %s not deleted (%s): a later start would read it again",
                     path, exc)


def _stored_at(row: Any) -> float:
    try:
        return float(row[3])
    except (TypeError, ValueError, IndexError):
        return 0.0
