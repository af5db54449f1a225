"""Bounds on what batch files may take: in all, and per API key.

Batch files live on disk (or in Redis) for up to 30 days, 48 MiB each; without a bound one
client uploading in a loop fills the server's disk, and every replica's batches, uploads'
temp files and logs fail with it. Uploads are refused past the bound (the client deletes
files or waits for them to expire); files the server writes (a batch's output and errors)
are never refused, as they hold finished work, but they count, so the next upload sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.config import Settings


@dataclass(frozen=True)
class Usage:
    files: int
    bytes: int


@dataclass(frozen=True)
class FileQuota:
    max_files: int
    max_bytes: int
    max_files_per_owner: int
    max_bytes_per_owner: int

    def refusal(self, size: int, owner: Usage, store: Usage) -> QuotaExceeded | None:
        """Why one more file of `size` bytes may not be kept, or None."""
        if owner.files + 1 > self.max_files_per_owner or (
                owner.bytes + size > self.max_bytes_per_owner):
            return QuotaExceeded(False, owner, size, self.max_files_per_owner,
                                 self.max_bytes_per_owner)
        if store.files + 1 > self.max_files or store.bytes + size > self.max_bytes:
            return QuotaExceeded(True, store, size, self.max_files, self.max_bytes)
        return None


class QuotaExceeded(Exception):
    """An upload past the key's share (`whole_store` False: the client's to fix, by
    deleting files) or past the whole store's bound (the operator's)."""

    def __init__(self, whole_store: bool, used: Usage, size: int, max_files: int,
                 max_bytes: int) -> None:
        whose = "the server's batch files" if whole_store else "this key's batch files"
        if size > max_bytes:  # no deleting makes room for it
            message = (f"this upload ({size:,} bytes) is larger than all {whose} may take "
                       f"({max_bytes:,} bytes)")
        else:
            message = (f"{whose} take {used.files:,} file(s), {used.bytes:,} bytes (expired "
                       "files and a running batch's deleted input count until they go), of "
                       f"at most {max_files:,} files and {max_bytes:,} bytes; this upload "
                       f"({size:,} bytes) would pass that")
        super().__init__(message)
        self.whole_store = whole_store
        self.too_large = size > max_bytes


# batch_store_mb's default: on disk, room for a few hundred full-size batches; in Redis,
# where every byte is memory, what a box's Redis can hold beside the other stores.
DISK_DEFAULT_MB = 20 * 1024
SHARED_DEFAULT_MB = 1024


def batch_store_mb(settings: Settings, shared: bool | None = None) -> int:
    """The store's bound in MiB; `shared` (default: whether settings name a shared store)
    picks the default when the settings leave it unset."""
    if settings.batch_store_mb is not None:
        return settings.batch_store_mb
    shared = settings.state_url != "memory://" if shared is None else shared
    return SHARED_DEFAULT_MB if shared else DISK_DEFAULT_MB


def batch_file_quota(settings: Settings, keys: int | None = None) -> FileQuota:
    """The settings' bounds; a key's share, unless set, is an even split among the
    configured keys (or `keys` of them), so no key can crowd out another."""
    keys = max(1, len(settings.api_keys) if keys is None else keys)
    mib = 1024 * 1024
    store_mb = batch_store_mb(settings)
    per_key_files = settings.batch_max_files_per_key or max(1, settings.batch_max_files // keys)
    per_key_mb = settings.batch_store_mb_per_key or max(1, store_mb // keys)
    return FileQuota(settings.batch_max_files, store_mb * mib, per_key_files, per_key_mb * mib)
