"""Batch storage on disk: JSONL files (inputs, outputs, errors), batch records, results.

One directory, one class: everything a batch needs to survive a restart goes through
`BatchStore`, so it can later sit on a shared store (issue 16) without its callers
changing. Layout under the root:

    files/<file id>.json        the file object (owner, name, purpose, size, time)
    files/<file id>.data        its bytes, as uploaded or written
    batches/<batch id>.json     the batch record, replaced atomically on every change
    batches/<batch id>.results  one JSON line per finished request, appended and fsync'd
    batches/<batch id>.images/  the uploaded images its lines name, decoded, until it ends

Nothing stays forever (`sweep`): a file goes once its `expires_at` has passed (OpenAI's
default for batch files: 30 days), a finished batch `batch_retention_s` after it ended,
and what a write killed half-way left (temporary files, bytes without a record) an hour
after it was written.
A results log goes as soon as its batch has written its output and error files.

A results line is written once its request has finished, before anything else learns of
it; on resume, the lines it names are not run again. A torn last line (a kill mid-write)
is ignored: that request runs again, and nothing saw its first answer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from server.batches.job import TERMINAL, ended_at
from server.batches.quota import FileQuota, Usage

logger = logging.getLogger("vlserve.batches")


@dataclass(frozen=True)
class BatchFile:
    id: str
    filename: str
    purpose: str  # batch, batch_output
    bytes: int
    created_us: int
    owner: str = ""
    expires_at: int | None = None  # seconds since the epoch; None: kept until deleted

    @property
    def created_at(self) -> int:
        return self.created_us // 1_000_000

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    @property
    def order_key(self) -> tuple[int, str]:
        return self.created_us, self.id


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(16)}"


def new_file(filename: str, purpose: str, size: int, owner: str, file_id: str | None,
             ttl_s: int | None) -> BatchFile:
    """A file's record, expiring `ttl_s` after its creation (OpenAI's `created_at` anchor)."""
    created_us = time.time_ns() // 1000
    expires_at = None if ttl_s is None else created_us // 1_000_000 + ttl_s
    return BatchFile(file_id or new_id("file"), filename, purpose, size, created_us, owner,
                     expires_at)


@dataclass(frozen=True)
class Swept:
    """What one sweep deleted."""

    files: list[str]
    batches: list[str]
    leftovers: list[str] = field(default_factory=list)  # names of interrupted writes


# A temporary file, or a file's bytes without its record, this old is what a write killed
# half-way left (a kill -9, a power cut); younger ones may be a write under way.
LEFTOVER_S = 3600


class BatchStore:
    """Directory-backed; safe to call from several threads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._files = root / "files"
        self._batches = root / "batches"
        self._lock = threading.Lock()  # appends to results logs
        self._record_lock = threading.Lock()  # batch records
        self._quota_lock = threading.Lock()  # an upload's quota check and its reservation
        self._writing: list[tuple[str, int]] = []  # (owner, bytes) of uploads being written
        self._versions: dict[str, int] = {}  # the newest record written, per batch

    def _ensure(self) -> None:
        """Created on the first write: a server that never sees a batch leaves no trace."""
        self._files.mkdir(parents=True, exist_ok=True)
        self._batches.mkdir(parents=True, exist_ok=True)

    # --- files -------------------------------------------------------------------------
    def add_file(self, filename: str, purpose: str, data: bytes, owner: str = "",
                 file_id: str | None = None, ttl_s: int | None = None,
                 quota: FileQuota | None = None) -> BatchFile:
        """Keep the file; with `quota` (an upload), QuotaExceeded past it. The check and
        the write hold one lock, so two uploads at once cannot both take the last room."""
        if quota is None:  # a batch's own output: never refused
            return self._add_file(filename, purpose, data, owner, file_id, ttl_s)
        upload = (owner, len(data))
        with self._quota_lock:  # the check and the room it reserves; the write runs after
            refusal = quota.refusal(len(data), *self.usage(owner))
            if refusal is not None:
                raise refusal
            self._writing.append(upload)
        try:
            return self._add_file(filename, purpose, data, owner, file_id, ttl_s)
        finally:
            with self._quota_lock:
                self._writing.remove(upload)

    def usage(self, owner: str) -> tuple[Usage, Usage]:
        """What `owner`'s files take, and every file: all that is on disk, expired or
        hidden ones included until the sweep deletes them (they still take the room),
        and uploads being written."""
        mine = every = Usage(0, 0)
        records = (self._read_file(path.stem) for path in self._files.glob("*.json"))
        sizes = [(r.owner, r.bytes) for r in records if r is not None]
        for who, size in sizes + self._writing:
            every = Usage(every.files + 1, every.bytes + size)
            if who == owner:
                mine = Usage(mine.files + 1, mine.bytes + size)
        return mine, every

    def _add_file(self, filename: str, purpose: str, data: bytes, owner: str,
                  file_id: str | None, ttl_s: int | None) -> BatchFile:
        record = new_file(filename, purpose, len(data), owner, file_id, ttl_s)
        self._ensure()
        data_path = self._files / f"{record.id}.data"
        record_path = self._files / f"{record.id}.json"
        rewrite = record_path.exists()  # a batch's output written again, same id and bytes
        _write_atomic(data_path, data)
        try:
            _write_atomic(record_path, json.dumps(asdict(record)).encode())
        except BaseException:
            if not rewrite:
                data_path.unlink(missing_ok=True)  # no record: nothing would ever sweep it
            raise
        return record

    def get_file(self, file_id: str, owner: str | None = None) -> BatchFile | None:
        """The file, if it exists, has not expired and (owner given) belongs to `owner`."""
        record = self._read_file(file_id)
        if record is None or record.expired(time.time()):
            return None
        return record if owner is None or record.owner == owner else None

    def _read_file(self, file_id: str) -> BatchFile | None:
        if not _safe_id(file_id):
            return None
        try:
            return BatchFile(**json.loads((self._files / f"{file_id}.json").read_bytes()))
        except (OSError, ValueError, TypeError):
            return None

    def file_bytes(self, file_id: str) -> bytes:
        """The bytes, expired or not: a running batch reads its input until the sweep,
        which spares the inputs of unfinished batches, deletes it."""
        return (self._files / f"{file_id}.data").read_bytes()

    def open_file(self, file_id: str) -> BinaryIO:
        """The bytes as a stream, to send without holding a whole output file in memory;
        once opened, a delete (or an output rewritten in place) does not cut it short."""
        return (self._files / f"{file_id}.data").open("rb")

    def expire_file(self, file_id: str, now: float) -> None:
        """Hide the file from now on (a GET, listing or new batch misses it) but keep its
        bytes: the sweep deletes them once no unfinished batch reads them."""
        record = self._read_file(file_id)
        if record is not None and not record.expired(now):
            _write_atomic(self._files / f"{file_id}.json",
                          json.dumps(asdict(replace(record, expires_at=int(now)))).encode())

    def delete_file(self, file_id: str) -> None:
        for suffix in (".json", ".data"):  # the record first: a half-deleted file is absent
            (self._files / f"{file_id}{suffix}").unlink(missing_ok=True)

    def list_files(self, owner: str) -> list[BatchFile]:
        files = (self.get_file(p.stem, owner) for p in self._files.glob("*.json"))
        return [f for f in files if f is not None]

    # --- batches -----------------------------------------------------------------------
    def save_batch(self, batch_id: str, data: bytes, version: int) -> None:
        """Replace the batch's record with `data` (its JSON), unless a newer version (a
        higher number) was written already: saves may finish out of order."""
        self._ensure()
        with self._record_lock:  # one writer at a time: they share the temp file's name
            if self._versions.get(batch_id, 0) > version:
                return
            self._versions[batch_id] = version
            _write_atomic(self._batches / f"{batch_id}.json", data)

    def delete_batch(self, batch_id: str) -> None:
        """Forget a finished batch: its record, results log and image copies."""
        self.drop_images(batch_id)
        self.drop_results(batch_id)
        (self._batches / f"{batch_id}.json").unlink(missing_ok=True)
        with self._record_lock:
            self._versions.pop(batch_id, None)

    def sweep(self, now: float, retention_s: int | None, keep: set[str]) -> Swept:
        """Delete the files expired by `now` (but those in `keep`: inputs of unfinished
        batches) and the batches that ended `retention_s` or more before it."""
        files = [p.stem for p in self._files.glob("*.json")]
        expired = [f for f in files if f not in keep and (record := self._read_file(f))
                   is not None and record.expired(now)]
        for file_id in expired:
            self.delete_file(file_id)
        old: list[str] = []
        if retention_s is not None:
            old = [b["id"] for b in self.load_batches() if b["status"] in TERMINAL
                   and ended_at(b) + retention_s <= now]
        for batch_id in old:
            self.delete_batch(batch_id)
        leftovers = self._sweep_leftovers(now)
        if leftovers:
            logger.info("deleted %d leftovers of interrupted writes under %s: %s",
                        len(leftovers), self.root, ", ".join(leftovers[:10]))
        return Swept(expired, old, leftovers)

    def _sweep_leftovers(self, now: float) -> list[str]:
        """Delete what a write killed half-way left, LEFTOVER_S after it was last written:
        `<name>.tmp` (_write_atomic's) and a file's bytes without a record (add_file writes
        the bytes first). Nothing else would ever find them: listings go by records."""
        found = [*self._files.glob("*.tmp"), *self._batches.glob("*.tmp"),
                 *self._batches.glob("*.images/*.tmp"),
                 *(p for p in self._files.glob("*.data") if not p.with_suffix(".json").exists())]
        deleted: list[str] = []
        for path in found:
            with contextlib.suppress(FileNotFoundError):  # renamed or deleted meanwhile
                if path.stat().st_mtime + LEFTOVER_S <= now:
                    path.unlink()
                    deleted.append(str(path.relative_to(self.root)))
        return deleted

    def load_batches(self) -> Iterator[dict[str, Any]]:
        for path in sorted(self._batches.glob("*.json")):
            try:
                yield json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue  # a half-written temp file never has the .json name; skip junk

    # --- images a batch references (uploads live in memory: kept here until it ends) ---
    def save_image(self, batch_id: str, meta: dict[str, Any], rgb: bytes) -> None:
        folder = self._batches / f"{batch_id}.images"
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / f"{meta['id']}.rgb", rgb)
        _write_atomic(folder / f"{meta['id']}.json", json.dumps(meta).encode())

    def load_images(self, batch_id: str) -> Iterator[tuple[dict[str, Any], bytes]]:
        for path in sorted((self._batches / f"{batch_id}.images").glob("*.json")):
            try:
                yield json.loads(path.read_bytes()), path.with_suffix(".rgb").read_bytes()
            except (OSError, ValueError):
                continue

    def drop_images(self, batch_id: str) -> None:
        folder = self._batches / f"{batch_id}.images"
        for path in folder.glob("*"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            folder.rmdir()

    def append_result(self, batch_id: str, result: dict[str, Any]) -> None:
        """Append one finished request durably (flushed and fsync'd before returning)."""
        self.append_results(batch_id, [result])

    def append_results(self, batch_id: str, results: list[dict[str, Any]]) -> None:
        """Append several at once: one write and one fsync, all or none (an expired batch
        records every line it never ran in one go)."""
        line = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in results).encode()
        # Unbuffered: a failed write is this call's, not a later flush's.
        with self._lock, (self._batches / f"{batch_id}.results").open("ab", buffering=0) as out:
            end = out.tell()
            try:
                view = memoryview(line)
                while view:  # a write may put down part of the line and say so
                    view = view[out.write(view):]
                os.fsync(out.fileno())
            except OSError:
                # A full disk wrote part of the line: cut it off, or the retried line would
                # be glued to it and both lost to the reader.
                out.truncate(end)
                raise

    def drop_results(self, batch_id: str) -> None:
        """Once the output and error files hold them (the final status is saved)."""
        (self._batches / f"{batch_id}.results").unlink(missing_ok=True)

    def read_results(self, batch_id: str) -> list[dict[str, Any]]:
        """Every complete results line; a torn last one (killed mid-write) is dropped."""
        path = self._batches / f"{batch_id}.results"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        results: list[dict[str, Any]] = []
        for raw in data.split(b"\n"):
            try:
                results.append(json.loads(raw))
            except ValueError:
                continue
        return results


def _safe_id(file_id: str) -> bool:
    """Ids become file names: only our own shape (prefix, dash, hex) gets near the disk."""
    prefix, _, rest = file_id.partition("-")
    return prefix.isalpha() and 0 < len(rest) <= 64 and all(
        c in "0123456789abcdef" for c in rest)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename over: a reader (or a restart) sees the old or the new, whole."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not stay full of half-written files
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
