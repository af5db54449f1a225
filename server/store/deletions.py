"""Deletes made between two snapshot writes (server.store.snapshot_writer). With periodic
writes the snapshot on disk lags the tables by up to an interval, so a crash in that
window would bring back what a client deleted (a conversation it asked us to forget).
Each delete from a snapshotted table is appended at once to `<snapshot>.deleted` (one
short append, no fsync: it survives a killed process, not a power cut); the next start
deletes those entries again right after reading the snapshot, and each snapshot write
drops the lines it has made stale. Keys are random ids, never reused, so replaying a line
the snapshot already reflects changes nothing."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from server.store.snapshot import Tables, journal_path

logger = logging.getLogger("vlserve.store")


class DeletionJournal:
    def __init__(self, snapshot: Path) -> None:
        self.path = journal_path(snapshot)
        self._lock = threading.Lock()
        self._failing = False

    def watch(self, tables: Tables) -> None:
        """Note every delete from `tables` from now on."""
        for name, (table, _) in tables.items():
            table.on_delete = lambda owner, key, name=name: self.note(name, owner, key)

    def note(self, table: str, owner: str, key: str) -> None:
        line = json.dumps([time.time(), table, owner, key], separators=(",", ":")) + "\n"
        try:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line.encode())
                finally:
                    os.close(fd)
            self._failing = False
        except OSError as exc:  # a full disk: the delete itself stands; logged once
            if not self._failing:
                logger.error("state snapshot: a delete not noted in %s (%s): a crash before "
                             "the next snapshot write would bring it back", self.path, exc)
            self._failing = True

    def length(self) -> int:
        """Bytes noted so far: a snapshot whose tables are read after this holds them."""
        with self._lock:
            try:
                return self.path.stat().st_size
            except OSError:  # none yet (or no directory: the snapshot's write says so)
                return 0

    def forget(self, upto: int) -> None:
        """Drop the first `upto` bytes (whole lines, as `length` found them: deletes the
        last write holds); those noted since stay for the next write. By position, not
        time: a clock that steps back cannot drop a delete made after the read."""
        with self._lock:
            try:
                noted = self.path.read_bytes()
            except FileNotFoundError:
                return
            rest = noted[upto:]
            if not rest:
                self.path.unlink(missing_ok=True)
                return
            part = self.path.with_name(self.path.name + ".part")
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(rest)
            os.replace(part, self.path)

    def replay(self, tables: Tables) -> int:
        """Delete again what the journal names (at a start, after the snapshot was read):
        the entries removed."""
        removed = 0
        for line in self._lines():
            try:
                _, name, owner, key = json.loads(line)
                removed += tables[name][0].delete(owner, key) if name in tables else 0
            except (ValueError, TypeError, AttributeError):  # a line cut short by the crash
                continue
        return removed

    def _lines(self) -> list[str]:
        try:
            with self.path.open() as journal:
                return [line for line in journal if line.endswith("\n")]
        except FileNotFoundError:
            return []

