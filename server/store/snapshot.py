"""The single-box store (`memory://`) kept across a restart: the stored responses,
conversations and chat completions are written to `state_snapshot` (one JSON file,
readable by the server's user only) at a graceful stop and, every
`state_snapshot_interval_s` while the server runs, when they changed
(server.store.snapshot_writer); the next start reads them back. Entries keep their age
(their TTLs go on counting, those that ran out while the server was down are dropped) and
each owner's use order (least recently used goes first, as before the stop).

The trade: with periodic writes the file exists while the server runs, so after a crash
(OOM kill, SIGKILL, power) the next start brings back the last write: what changed since
(at most one interval) is lost; what was deleted since stays deleted through the deletes
journal (server.store.deletions). With the interval at 0 the file is written only at a
graceful stop and deleted once the server has started from it: a crash loses everything
since the start."""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server.store.memory import MemoryTable
from server.store.snapshot_reader import records
from server.store.table import Codec

logger = logging.getLogger("vlserve.store")

VERSION = 1
Tables = Mapping[str, tuple[MemoryTable[Any], Codec[Any]]]


def save(path: Path, tables: Tables) -> int:
    """Write every live entry of `tables` (JSON records, not pixels: a record's body, if
    its codec has one, goes along in base64); the number of entries written. A write that
    fails leaves no partial file behind."""
    # Each table read at one moment; the records are encoded one at a time as they are
    # written, so a write holds one record's JSON, not a copy of the stores.
    contents = {name: table.contents() for name, (table, _) in tables.items()}
    order = {name: contents[name][1] for name, (table, _) in tables.items()
             if table.bounds.lru}  # else each owner's order is its storing order, as restored
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.unlink(missing_ok=True)  # a stale one: created afresh, so its mode is ours
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # private data
        with os.fdopen(fd, "w") as out:
            out.write(f'{{"version":{VERSION},"saved_at":{time.time()!r},"order":')
            json.dump(order, out, separators=(",", ":"))
            out.write(',"tables":{')
            written = 0
            for index, (name, (_, codec)) in enumerate(tables.items()):
                out.write(f'{"," if index else ""}{json.dumps(name)}:[')
                for row, entry in enumerate(contents[name][0]):
                    head, body = codec.encode(entry.value)
                    fields = [entry.owner, entry.key, entry.size, entry.stored_at,
                              head.decode()]
                    if body:
                        fields.append(base64.b64encode(body).decode())
                    out.write(("," if row else "") + json.dumps(fields, separators=(",", ":")))
                    written += 1
                out.write("]")
            out.write("}}")
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, path)
        _sync_directory(path.parent)  # the rename itself survives a power cut
    finally:
        part.unlink(missing_ok=True)
    return written


def _sync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # a platform that cannot open a directory: the rename is as durable as it gets
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: Path, tables: Tables) -> tuple[int, int]:
    """Read a snapshot back into `tables` (it stays until `discard` or the next write):
    (entries restored, entries skipped: expired, over today's bounds, or unreadable), each
    owner's use order as it was. Read one record at a time (server.store.snapshot_reader).
    A file that is no snapshot is set aside as `<name>.bad`: the server goes on without
    it (with what was read before the fault, if it came late in the file)."""
    if not path.is_file():
        return 0, 0
    fields: dict[str, Any] = {}
    restored = skipped = 0
    try:
        with path.open(encoding="utf-8") as file:
            # Restored in file order: the writer writes each table in storing order.
            for name, row in records(file, fields):
                if fields.get("version") != VERSION:  # written first: known by now
                    raise ValueError("not a version-1 snapshot")
                if name not in tables:
                    continue
                if _restore(path, name, row, *tables[name]):
                    restored += 1
                else:
                    skipped += 1
        if fields.get("version") != VERSION:
            raise ValueError("not a version-1 snapshot")
    except (OSError, ValueError) as exc:
        logger.error("state snapshot %s unreadable (%s): starting without it, kept as %s.bad",
                     path, exc, path.name)
        os.replace(path, path.with_name(path.name + ".bad"))
        return restored, skipped
    _arrange(fields.get("order"), tables)
    return restored, skipped


def _restore(path: Path, name: str, row: Any, table: MemoryTable[Any],
             codec: Codec[Any]) -> bool:
    """One record back into its table; False when skipped."""
    try:
        owner, key, size, stored_at, head, *body = row  # a body: a 6th field
        value = codec.decode(head.encode(), base64.b64decode(body[0]) if body else b"")
        return table.restore(owner, key, value, size, stored_at)
    except Exception as exc:  # a record another version wrote: that one is lost
        logger.warning("state snapshot %s: a %s entry skipped: %r", path, name, exc)
        return False


def _arrange(order: Any, tables: Tables) -> None:
    """Each owner's use order as written (restored by storing order, an owner at its share
    would otherwise lose its oldest entry rather than its least recently used). A snapshot
    without it (an older version's) keeps the storing order."""
    if not isinstance(order, dict):
        return
    for name, owners in order.items():
        if name in tables and isinstance(owners, dict):
            for owner, keys in owners.items():
                if isinstance(keys, list):
                    tables[name][0].arrange(owner, keys)


_claimed: dict[Path, int] = {}  # the lock files this process holds, open for its life


def claim(path: Path) -> bool:
    """Hold `<path>.lock` while this process lives; False when another process (a second
    server given the same file) holds it: two writers would overwrite each other's
    stores. A lock file that cannot even be made counts as claimed: the writes fail then,
    and say so."""
    if path in _claimed:
        return True
    lock = path.with_name(path.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _claimed[path] = fd
    return True


def journal_path(path: Path) -> Path:
    """The deletes made since the snapshot's last write (server.store.deletions)."""
    return path.with_name(path.name + ".deleted")


def discard(path: Path) -> None:
    """Delete a snapshot (and its deletes journal) once the server has started from it (no
    periodic writes)."""
    for file in (path, journal_path(path)):
        try:
            file.unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass  # there was none
        except OSError as exc:
            logger.error("state snapshot %s not deleted (%s): a later start would read it "
                         "again", file, exc)
