"""Uploaded images, kept decoded in memory: bounded by count and bytes, expiring after a TTL."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from server.engine import ImageInput


@dataclass(frozen=True)
class StoredFile:
    id: str
    filename: str
    purpose: str
    bytes: int  # size of the uploaded file
    created_at: int
    image: ImageInput  # decoded and downsized at upload time
    owner: str = ""  # the uploader's client identity: only the same client sees the file

    @property
    def stored_bytes(self) -> int:
        return len(self.image.rgb)


class UploadStore:
    """LRU by last use; `get` refreshes an entry, expired entries vanish on access.

    Every call names the client (`owner`); a file of another client is as good as absent.
    """

    def __init__(self, max_files: int, max_bytes: int, ttl_s: float) -> None:
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._files: OrderedDict[str, StoredFile] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def add(self, filename: str, purpose: str, size: int, image: ImageInput,
            owner: str = "") -> StoredFile:
        # 128 random bits: ids are unguessable, and listings show a client its own files only.
        record = StoredFile(f"file-{secrets.token_hex(16)}", filename, purpose, size,
                            int(time.time()), image, owner)
        with self._lock:
            self._expire()
            self._files[record.id] = record
            self._used += record.stored_bytes
            while self._files and (len(self._files) > self.max_files
                                   or self._used > self.max_bytes):
                _, evicted = self._files.popitem(last=False)
                self._used -= evicted.stored_bytes
        return record

    def get(self, file_id: str, owner: str = "") -> StoredFile | None:
        with self._lock:
            self._expire()
            record = self._files.get(file_id)
            if record is None or record.owner != owner:
                return None
            self._files.move_to_end(file_id)
            return record

    def delete(self, file_id: str, owner: str = "") -> bool:
        with self._lock:
            record = self._files.get(file_id)
            if record is None or record.owner != owner:
                return False
            del self._files[file_id]
            self._used -= record.stored_bytes
            return True

    def list(self, owner: str = "") -> list[StoredFile]:
        with self._lock:
            self._expire()
            mine = [f for f in self._files.values() if f.owner == owner]
            return sorted(mine, key=lambda f: f.created_at)

    def _expire(self) -> None:
        cutoff = time.time() - self.ttl_s
        for file_id in [k for k, v in self._files.items() if v.created_at < cutoff]:
            self._used -= self._files.pop(file_id).stored_bytes
