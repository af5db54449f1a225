"""The single-box store (`memory://`) kept across a restart: at a graceful stop the stored
responses and conversations are written to `state_snapshot` (one JSON file, readable by the
server's user only) and read back at the next start. The file is deleted once read, so a
crash later cannot bring back what was deleted meanwhile (a crash loses what changed since
the start, as without a snapshot). Entries keep their age: their TTLs go on counting, and
those that ran out while the server was down are dropped."""

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
    JSON records, not pixels); the number of entries written."""
    snapshot: dict[str, Any] = {"version": VERSION, "saved_at": time.time(), "tables": {}}
    written = 0
    for name, (table, codec) in tables.items():
        rows = []
        for entry in table.entries():
            head, body = codec.encode(entry.value)
            assert not body, f"{name}: a snapshot keeps records, not bodies"
            rows.append([entry.owner, entry.key, entry.size, entry.stored_at, head.decode()])
        snapshot["tables"][name] = rows
        written += len(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # private data
    with os.fdopen(fd, "w") as out:
        json.dump(snapshot, out, separators=(",", ":"))
        out.flush()
        os.fsync(out.fileno())
    os.replace(part, path)
    return written


def load(path: Path, tables: Tables) -> int:
    """Read a snapshot back into `tables`, then delete it; the number of entries restored
    (none when there is no snapshot; an unreadable one is set aside as `<name>.bad`)."""
    try:
        snapshot = json.loads(path.read_text())
        if snapshot.get("version") != VERSION:
            raise ValueError(f"version {snapshot.get('version')!r}, not {VERSION}")
        saved = snapshot["tables"]
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.error("state snapshot %s unreadable (%s): starting without it, kept as %s.bad",
                     path, exc, path.name)
        os.replace(path, path.with_name(path.name + ".bad"))
        return 0
    restored = 0
    for name, rows in saved.items():
        if name not in tables:
            continue
        table, codec = tables[name]
        for owner, key, size, stored_at, head in sorted(rows, key=lambda row: row[3]):
            restored += table.restore(owner, key, codec.decode(head.encode(), b""), size,
                                      stored_at)
    path.unlink()
    return restored
