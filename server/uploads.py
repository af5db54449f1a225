"""Uploaded images, kept decoded (in memory, or in the shared store: server.store): bounded
per key and in all, expiring after a TTL.

Each client (API key) has its own quota of files and bytes and its own LRU: a key's upload
may evict that key's least recently used files, never another key's. When the store as a
whole is full (quotas that add up to more than the store), an upload is refused instead.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

from server.config import Settings
from server.engine import ImageInput
from server.store import Bounds, Codec, StateBackend, Table, TableFull
from server.store.memory import MemoryTable


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


def _new_record(filename: str, purpose: str, size: int, image: ImageInput, owner: str,
                source_size: tuple[int, int] | None, max_bytes: int) -> StoredFile:
    """The record an upload becomes; UploadRefused (413) for one file over the quota."""
    # 128 random bits: ids are unguessable, and listings show a client its own files only.
    record = StoredFile(f"file-{secrets.token_hex(16)}", filename, purpose, size,
                        time.time_ns() // 1000, image, owner, source_size)
    if record.stored_bytes > max_bytes:
        raise UploadRefused(413, f"the decoded image takes {record.stored_bytes:,} bytes; the "
                            f"upload quota is {max_bytes:,} bytes", "upload_quota_exceeded")
    return record


def _store_full() -> UploadRefused:
    return UploadRefused(507, "the upload store is full (other clients' files are never "
                         "evicted); try again later", "upload_store_full")


def _bounds(max_files: int, max_bytes: int, ttl_s: float, max_files_per_owner: int | None,
            max_bytes_per_owner: int | None) -> Bounds:
    # LRU by last use; a full store refuses rather than evicting another client's files.
    return Bounds(max_files, max_bytes, ttl_s, max_files_per_owner or max_files,
                  max_bytes_per_owner or max_bytes, lru=True, evict_others=False)


class UploadStore:
    """Per-owner LRU by last use; `get` refreshes an entry, expired entries vanish on access.

    Every call names the client (`owner`); a file of another client is as good as absent.
    The in-memory store, called synchronously; the routes use `Uploads`, its async face
    over either backend.
    """

    def __init__(self, max_files: int, max_bytes: int, ttl_s: float, *,
                 max_files_per_owner: int | None = None,
                 max_bytes_per_owner: int | None = None) -> None:
        self.bounds = _bounds(max_files, max_bytes, ttl_s, max_files_per_owner,
                              max_bytes_per_owner)
        self.table: MemoryTable[StoredFile] = MemoryTable(self.bounds)

    @property
    def max_files_per_owner(self) -> int:
        return self.bounds.max_count_per_owner

    @property
    def max_bytes_per_owner(self) -> int:
        return self.bounds.max_bytes_per_owner

    def add(self, filename: str, purpose: str, size: int, image: ImageInput,
            owner: str = "", source_size: tuple[int, int] | None = None) -> StoredFile:
        """Keep the file, evicting the owner's own least recently used files if needed.

        Raises UploadRefused (413) for one file over the owner's byte quota, or (507) when
        the whole store is full and the owner has nothing left to evict.
        """
        record = _new_record(filename, purpose, size, image, owner, source_size,
                             _one_file_max(self.bounds))
        try:
            self.table.put(owner, record.id, record, record.stored_bytes)
        except TableFull:
            raise _store_full() from None
        return record

    def get(self, file_id: str, owner: str = "") -> StoredFile | None:
        return self.table.get(owner, file_id)

    def delete(self, file_id: str, owner: str = "") -> bool:
        return self.table.delete(owner, file_id)

    def list(self, owner: str = "") -> list[StoredFile]:
        """The owner's files in a total order (creation to the microsecond, then id) that
        no read changes, so cursor pages neither skip nor repeat."""
        return sorted(self.table.values(owner), key=lambda f: f.order_key)

    def owner_usage(self, owner: str = "") -> tuple[int, int]:
        """(files, stored bytes) held for `owner`."""
        return self.table.owner_usage(owner)


class Uploads:
    """The upload store as the routes use it: async, in memory or shared (server.store).
    A shared store carries the decoded pixels; another replica's engine encodes them anew
    on first use (its own embedding cache misses)."""

    def __init__(self, table: Table[StoredFile], bounds: Bounds) -> None:
        self.table = table
        self.bounds = bounds

    async def add(self, filename: str, purpose: str, size: int, image: ImageInput,
                  owner: str = "", source_size: tuple[int, int] | None = None) -> StoredFile:
        """As UploadStore.add; StateUnavailable when the shared store is out of reach."""
        record = _new_record(filename, purpose, size, image, owner, source_size,
                             _one_file_max(self.bounds))
        try:
            await self.table.put(owner, record.id, record, record.stored_bytes)
        except TableFull:
            raise _store_full() from None
        return record

    async def get(self, file_id: str, owner: str = "") -> StoredFile | None:
        return await self.table.get(owner, file_id)

    async def delete(self, file_id: str, owner: str = "") -> bool:
        return await self.table.delete(owner, file_id)

    async def list(self, owner: str = "") -> list[StoredFile]:
        """As UploadStore.list; the records carry no pixels when the store is shared."""
        return sorted(await self.table.heads(owner), key=lambda f: f.order_key)


def _one_file_max(bounds: Bounds) -> int:
    return min(bounds.max_bytes_per_owner, bounds.max_bytes)


def _encode(record: StoredFile) -> tuple[bytes, bytes]:
    image = record.image
    head = {"id": record.id, "filename": record.filename, "purpose": record.purpose,
            "bytes": record.bytes, "created_us": record.created_us, "owner": record.owner,
            "source_size": record.source_size, "width": image.width, "height": image.height,
            "content_hash": image.content_hash}
    return json.dumps(head).encode(), image.rgb


def _decode(head: bytes, body: bytes | None) -> StoredFile:
    """A record from the shared store; a listing (body None) gets empty pixels."""
    h = json.loads(head)
    size = tuple(h["source_size"]) if h["source_size"] else None
    return StoredFile(h["id"], h["filename"], h["purpose"], h["bytes"], h["created_us"],
                      ImageInput(body or b"", h["width"], h["height"], h["content_hash"]),
                      h["owner"], size)  # type: ignore[arg-type]


UPLOAD_CODEC: Codec[StoredFile] = Codec(_encode, _decode)


def upload_store(settings: Settings, keys: int | None = None) -> UploadStore:
    """The store the settings describe. Per-key quotas default to an even share of the
    store among the configured keys (or `keys` of them), so no key can crowd out another."""
    keys = max(1, len(settings.api_keys) if keys is None else keys)
    per_key_files = settings.upload_max_files_per_key or max(1, settings.upload_max_files // keys)
    per_key_mb = settings.upload_store_mb_per_key or max(1, settings.upload_store_mb // keys)
    return UploadStore(settings.upload_max_files, settings.upload_store_mb * 1024 * 1024,
                       settings.upload_ttl_s, max_files_per_owner=per_key_files,
                       max_bytes_per_owner=per_key_mb * 1024 * 1024)


def open_uploads(settings: Settings, backend: StateBackend) -> Uploads:
    """The routes' upload store, with upload_store's bounds, where `state_url` says."""
    bounds = upload_store(settings).bounds
    return Uploads(backend.table("files", bounds, UPLOAD_CODEC), bounds)
