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

    @property
    def stored_bytes(self) -> int:
        return len(self.image.rgb)


class UploadStore:
    """LRU by last use; `get` refreshes an entry, expired entries vanish on access."""

    def __init__(self, max_files: int, max_bytes: int, ttl_s: float) -> None:
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._files: OrderedDict[str, StoredFile] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def add(self, filename: str, purpose: str, size: int, image: ImageInput) -> StoredFile:
        # 128 random bits: ids are unguessable, so one client cannot reach another's files.
        record = StoredFile(f"file-{secrets.token_hex(16)}", filename, purpose, size,
                            int(time.time()), image)
        with self._lock:
            self._expire()
            self._files[record.id] = record
            self._used += record.stored_bytes
            while self._files and (len(self._files) > self.max_files
                                   or self._used > self.max_bytes):
                _, evicted = self._files.popitem(last=False)
                self._used -= evicted.stored_bytes
        return record

    def get(self, file_id: str) -> StoredFile | None:
        with self._lock:
            self._expire()
            record = self._files.get(file_id)
            if record is not None:
                self._files.move_to_end(file_id)
            return record

    def delete(self, file_id: str) -> bool:
        with self._lock:
            record = self._files.pop(file_id, None)
            if record is not None:
                self._used -= record.stored_bytes
            return record is not None

    def list(self) -> list[StoredFile]:
        with self._lock:
            self._expire()
            return sorted(self._files.values(), key=lambda f: f.created_at)

    def _expire(self) -> None:
        cutoff = time.time() - self.ttl_s
        for file_id in [k for k, v in self._files.items() if v.created_at < cutoff]:
            self._used -= self._files.pop(file_id).stored_bytes
