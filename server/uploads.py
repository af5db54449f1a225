"""Uploaded images, kept decoded in memory: bounded per key and in all, expiring after a TTL.

Each client (API key) has its own quota of files and bytes and its own LRU: a key's upload
may evict that key's least recently used files, never another key's. When the store as a
whole is full (quotas that add up to more than the store), an upload is refused instead.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from server.config import Settings
from server.engine import ImageInput


@dataclass(frozen=True)
class StoredFile:
    id: str
    filename: str
    purpose: str
    bytes: int  # size of the uploaded file
    created_us: int  # microseconds since the epoch: with the id, the listing's total order
    image: ImageInput  # decoded at upload time, at the `high` detail size
    owner: str = ""  # the uploader's client identity: only the same client sees the file
    source_size: tuple[int, int] | None = None  # the file's own (width, height), oriented

    @property
    def created_at(self) -> int:
        """Seconds, as OpenAI's file objects carry it."""
        return self.created_us // 1_000_000

    @property
    def stored_bytes(self) -> int:
        return len(self.image.rgb)

    @property
    def order_key(self) -> tuple[int, str]:
        return self.created_us, self.id


class UploadRefused(Exception):
    """An upload the store cannot keep; `status` and `code` are for the API's answer."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class UploadStore:
    """Per-owner LRU by last use; `get` refreshes an entry, expired entries vanish on access.

    Every call names the client (`owner`); a file of another client is as good as absent.
    """

    def __init__(self, max_files: int, max_bytes: int, ttl_s: float, *,
                 max_files_per_owner: int | None = None,
                 max_bytes_per_owner: int | None = None) -> None:
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.max_files_per_owner = max_files_per_owner or max_files
        self.max_bytes_per_owner = max_bytes_per_owner or max_bytes
        self._owners: dict[str, OrderedDict[str, StoredFile]] = {}  # each in LRU order
        self._owner_bytes: dict[str, int] = {}
        self._count = 0
        self._used = 0
        self._lock = threading.Lock()

    def add(self, filename: str, purpose: str, size: int, image: ImageInput,
            owner: str = "", source_size: tuple[int, int] | None = None) -> StoredFile:
        """Keep the file, evicting the owner's own least recently used files if needed.

        Raises UploadRefused (413) for one file over the owner's byte quota, or (507) when
        the whole store is full and the owner has nothing left to evict.
        """
        # 128 random bits: ids are unguessable, and listings show a client its own files only.
        record = StoredFile(f"file-{secrets.token_hex(16)}", filename, purpose, size,
                            time.time_ns() // 1000, image, owner, source_size)
        need = record.stored_bytes
        if need > min(self.max_bytes_per_owner, self.max_bytes):
            raise UploadRefused(413, f"the decoded image takes {need:,} bytes; the upload "
                                f"quota is {self.max_bytes_per_owner:,} bytes",
                                "upload_quota_exceeded")
        with self._lock:
            self._expire()
            files = self._owners.setdefault(owner, OrderedDict())
            while files and (len(files) + 1 > self.max_files_per_owner
                             or self._owner_bytes.get(owner, 0) + need > self.max_bytes_per_owner
                             or self._count + 1 > self.max_files
                             or self._used + need > self.max_bytes):
                self._remove(next(iter(files.values())))
            if self._count + 1 > self.max_files or self._used + need > self.max_bytes:
                raise UploadRefused(507, "the upload store is full (other clients' files are "
                                    "never evicted); try again later", "upload_store_full")
            files[record.id] = record
            self._owner_bytes[owner] = self._owner_bytes.get(owner, 0) + need
            self._count += 1
            self._used += need
        return record

    def get(self, file_id: str, owner: str = "") -> StoredFile | None:
        with self._lock:
            self._expire()
            files = self._owners.get(owner)
            record = files.get(file_id) if files else None
            if files is None or record is None:
                return None
            files.move_to_end(file_id)
            return record

    def delete(self, file_id: str, owner: str = "") -> bool:
        with self._lock:
            files = self._owners.get(owner)
            record = files.get(file_id) if files else None
            if record is None:
                return False
            self._remove(record)
            return True

    def list(self, owner: str = "") -> list[StoredFile]:
        """The owner's files in a total order (creation to the microsecond, then id) that
        no read changes, so cursor pages neither skip nor repeat."""
        with self._lock:
            self._expire()
            return sorted(self._owners.get(owner, {}).values(), key=lambda f: f.order_key)

    def owner_usage(self, owner: str = "") -> tuple[int, int]:
        """(files, stored bytes) held for `owner`."""
        with self._lock:
            return len(self._owners.get(owner, ())), self._owner_bytes.get(owner, 0)

    def _remove(self, record: StoredFile) -> None:
        files = self._owners[record.owner]
        del files[record.id]
        self._owner_bytes[record.owner] -= record.stored_bytes
        self._count -= 1
        self._used -= record.stored_bytes  # an emptied owner's entry stays: one per key

    def _expire(self) -> None:
        cutoff = (time.time() - self.ttl_s) * 1_000_000
        expired = [f for files in self._owners.values() for f in files.values()
                   if f.created_us < cutoff]
        for record in expired:
            self._remove(record)


def upload_store(settings: Settings) -> UploadStore:
    """The store the settings describe. Per-key quotas default to an even share of the
    store among the configured keys, so no key can crowd out another."""
    keys = max(1, len(settings.api_keys))
    per_key_files = settings.upload_max_files_per_key or max(1, settings.upload_max_files // keys)
    per_key_mb = settings.upload_store_mb_per_key or max(1, settings.upload_store_mb // keys)
    return UploadStore(settings.upload_max_files, settings.upload_store_mb * 1024 * 1024,
                       settings.upload_ttl_s, max_files_per_owner=per_key_files,
                       max_bytes_per_owner=per_key_mb * 1024 * 1024)
