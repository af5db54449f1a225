"""Batch storage in Redis (`state_url: redis://...`): BatchStore's interface, shared by every
replica, plus what sharing needs: per-batch leases and cancel requests.

The methods are sync, as the disk store's, and callers run them off the event loop
(asyncio.to_thread) exactly as they do today: one interface, two stores, no caller that
knows which it has. A sync client's pool is thread-safe. Keys, under `vlserve:batches:`:

    file:<id>            hash: head (the BatchFile's JSON), data (its bytes)
    files:<owner>        zset id -> created_us: the owner's files
    rec:<id>             the batch record (JSON)
    owner:<owner>        zset id -> created_us: the owner's batches
    open                 set of ids not yet completed/failed/expired/cancelled
    ended                zset id -> when it ended: finished batches, for the sweep
    expiry               zset file id -> expires_at: files that expire, for the sweep
    sizes                hash file id -> bytes: every file, for the store's quota
    sizes:<owner>        hash file id -> bytes: the owner's files, for its share
    results:<id>         list: one JSON line per finished request (RPUSH, fenced by lease)
    images:<id>          hash: <file id> -> meta JSON, <file id>.rgb -> pixels
    lease:<id>           the replica token running the batch (SET NX PX, renewed)
    cancel:<id>          a cancel asked on a replica that does not run it (epoch seconds)

Fencing: a results append and a record save succeed only while this replica holds the
batch's lease (a save also while nobody does: the creator's first one), in one Lua script
each, so a replica that lost its lease can never add a second answer for a line.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any, BinaryIO

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from server.batches.job import TERMINAL, ended_at
from server.batches.quota import FileQuota, QuotaExceeded, Usage
from server.batches.store import BatchFile, BatchStore, Swept, new_file
from server.store import StateUnavailable

PREFIX = "vlserve:batches:"
_OPEN = PREFIX + "open"
_ENDED = PREFIX + "ended"
_EXPIRY = PREFIX + "expiry"

# KEYS: lease results. ARGV: token line...  1 appended, 0 not the holder.
_APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
return 1
"""
# KEYS: lease rec owner open cancel ended. ARGV: token data id created_us ended_at
# (empty: not finished).  1 saved, 0 another replica holds the batch.
_SAVE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
if ARGV[5] ~= '' then
  redis.call('SREM', KEYS[4], ARGV[3])
  redis.call('DEL', KEYS[5])
  redis.call('ZADD', KEYS[6], ARGV[5], ARGV[3])
else
  redis.call('SADD', KEYS[4], ARGV[3])
end
return 1
"""
# What a hash of sizes adds up to: {files, bytes}.
_USED = """
local function used(key)
  local total = 0
  for _, size in ipairs(redis.call('HVALS', key)) do total = total + tonumber(size) end
  return {redis.call('HLEN', key), total}
end
"""
# KEYS: file files:<owner> expiry sizes sizes:<owner>. ARGV: head data id created_us
# expires_at('') size, then the quota (max_files max_bytes per_owner_files
# per_owner_bytes) or nothing.  {0} kept; {1 or 2, files, bytes}: the owner's share (1) or
# the store (2) would overflow, with what it holds. One script: no two uploads at once can
# both take the last room.
_ADD_FILE = _USED + """
local size = tonumber(ARGV[6])
if #ARGV > 6 then
  local owner = used(KEYS[5])
  if owner[1] + 1 > tonumber(ARGV[9]) or owner[2] + size > tonumber(ARGV[10]) then
    return {1, owner[1], owner[2]}
  end
  local store = used(KEYS[4])
  if store[1] + 1 > tonumber(ARGV[7]) or store[2] + size > tonumber(ARGV[8]) then
    return {2, store[1], store[2]}
  end
end
redis.call('HSET', KEYS[1], 'head', ARGV[1], 'data', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
if ARGV[5] ~= '' then redis.call('ZADD', KEYS[3], ARGV[5], ARGV[3]) end
redis.call('HSET', KEYS[4], ARGV[3], size)
redis.call('HSET', KEYS[5], ARGV[3], size)
return {0}
"""
# KEYS: sizes sizes:<owner>.  {owner files, owner bytes, store files, store bytes}
_USAGE = _USED + """
local owner, store = used(KEYS[2]), used(KEYS[1])
return {owner[1], owner[2], store[1], store[2]}
"""
# KEYS: file sizes sizes:<owner>. ARGV: id size.  Counts a file stored without its size
# (by a replica of before sizes were counted), only while it still exists.
_COUNT_FILE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return 1
"""
# KEYS: file sizes-hash. ARGV: id.  Drops the size of a file deleted without it (the same
# replicas), only while the file is still absent.
_DROP_SIZE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
return redis.call('HDEL', KEYS[2], ARGV[1])
"""
_SIZES = PREFIX + "sizes"
_CHUNK = 500  # ids per round trip while reconciling

# KEYS: lease. ARGV: token ttl_ms.  1 renewed, 0 lost.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
# KEYS: lease. ARGV: token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""
# KEYS: open cancel. ARGV: id now.  1 flagged, 0 the batch already ended.
_CANCEL = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'NX')
return 1
"""


class LeaseLost(Exception):
    """Another replica holds the batch now: this one must not write for it."""


class RedisBatchStore:
    """One Redis, every replica; `token` names this replica in the leases it takes."""

    shared = True

    def __init__(self, url: str, token: str, timeout_s: float = 5.0) -> None:
        self.token = token
        # As the async store's client: half the limit per try and one retry, so a Redis
        # that vanished or hangs is a 503 within about timeout_s (the client's default
        # retries ten times, with backoff, which would hold a request far longer).
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s / 2, socket_connect_timeout=timeout_s / 2,
            retry=Retry(NoBackoff(), 1), health_check_interval=30)
        self._scripts = {name: self._client.register_script(text) for name, text in (
            ("append", _APPEND), ("save", _SAVE), ("renew", _RENEW),
            ("release", _RELEASE), ("cancel", _CANCEL), ("add_file", _ADD_FILE),
            ("usage", _USAGE), ("count_file", _COUNT_FILE), ("drop_size", _DROP_SIZE))}
        self._sizes_checked = False  # reconciled once by this process (then every sweep)

    def close(self) -> None:
        self._client.close()

    # --- files -------------------------------------------------------------------------
    def add_file(self, filename: str, purpose: str, data: bytes, owner: str = "",
                 file_id: str | None = None, ttl_s: int | None = None,
                 quota: FileQuota | None = None) -> BatchFile:
        """As the disk store's: with `quota` (an upload), QuotaExceeded past it."""
        record = new_file(filename, purpose, len(data), owner, file_id, ttl_s)
        limits = [] if quota is None else [
            quota.max_files, quota.max_bytes, quota.max_files_per_owner,
            quota.max_bytes_per_owner]
        with _guard():
            self._check_sizes_once()
            # One script: the head and the bytes appear together, with their size counted.
            kept = self._scripts["add_file"](
                keys=[_k("file", record.id), _k("files", owner), _EXPIRY, _SIZES,
                      _k("sizes", owner)],
                args=[json.dumps(asdict(record)), data, record.id, record.created_us,
                      "" if record.expires_at is None else record.expires_at, len(data),
                      *limits])
        if kept[0] != 0:
            assert quota is not None
            whole = kept[0] == 2
            raise QuotaExceeded(whole, Usage(int(kept[1]), int(kept[2])), len(data),
                                quota.max_files if whole else quota.max_files_per_owner,
                                quota.max_bytes if whole else quota.max_bytes_per_owner)
        return record

    def usage(self, owner: str) -> tuple[Usage, Usage]:
        """As the disk store's: `owner`'s files and every file, until deleted."""
        with _guard():
            self._check_sizes_once()
            files, size, all_files, all_size = self._scripts["usage"](
                keys=[_SIZES, _k("sizes", owner)])
        return Usage(int(files), int(size)), Usage(int(all_files), int(all_size))

    def _check_sizes_once(self) -> None:
        if not self._sizes_checked:
            self.reconcile_sizes()
            self._sizes_checked = True

    def reconcile_sizes(self) -> None:
        """Make the size hashes match the files. A replica of before sizes were counted (an
        upgraded deployment's files, or its old replicas still running through a rolling
        upgrade) stores files without their size and deletes them without dropping it:
        count the first, drop the second. Each fix is one script that checks the file
        again, so a concurrent add or delete is never undone."""
        client = self._client
        files = [key.decode().split(":")[-1] for key in client.scan_iter(
            match=_k("file", "*"), count=_CHUNK)]
        for chunk in _chunks(files):
            sized = client.hmget(_SIZES, chunk)
            for file_id, size in zip(chunk, sized, strict=True):
                head = None if size is not None else client.hget(_k("file", file_id), "head")
                if head is not None:
                    record = BatchFile(**json.loads(head))
                    self._scripts["count_file"](
                        keys=[_k("file", file_id), _SIZES, _k("sizes", record.owner)],
                        args=[file_id, record.bytes])
        present = set(files)
        for sizes in [_SIZES.encode(), *client.scan_iter(match=_k("sizes", "*"),
                                                          count=_CHUNK)]:
            stale = [i.decode() for i in client.hkeys(sizes) if i.decode() not in present]
            for file_id in stale:
                self._scripts["drop_size"](keys=[_k("file", file_id), sizes], args=[file_id])

    def get_file(self, file_id: str, owner: str | None = None) -> BatchFile | None:
        """The file, if it exists, has not expired and (owner given) belongs to `owner`."""
        with _guard():
            head = self._client.hget(_k("file", file_id), "head")
        if head is None:
            return None
        record = BatchFile(**json.loads(head))
        if record.expired(time.time()):
            return None
        return record if owner is None or record.owner == owner else None

    def file_bytes(self, file_id: str) -> bytes:
        with _guard():
            data = self._client.hget(_k("file", file_id), "data")
        if data is None:
            raise FileNotFoundError(file_id)  # as the disk store's read of a deleted file
        return bytes(data)

    def open_file(self, file_id: str) -> BinaryIO:
        """As the disk store's; a Redis hash field is read whole, so it is in memory here."""
        return io.BytesIO(self.file_bytes(file_id))

    def expire_file(self, file_id: str, now: float) -> None:
        """As the disk store's: hidden from now on, deleted by a sweep that spares it while
        an unfinished batch reads it."""
        with _guard():
            head = self._client.hget(_k("file", file_id), "head")
            if head is None:
                return
            record = BatchFile(**json.loads(head))
            if record.expired(now):
                return
            pipe = self._client.pipeline()
            pipe.hset(_k("file", file_id), "head",
                      json.dumps(asdict(replace(record, expires_at=int(now)))))
            pipe.zadd(_EXPIRY, {file_id: int(now)})
            pipe.execute()

    def delete_file(self, file_id: str) -> None:
        with _guard():
            head = self._client.hget(_k("file", file_id), "head")
            pipe = self._client.pipeline()
            pipe.delete(_k("file", file_id))
            pipe.zrem(_EXPIRY, file_id)
            pipe.hdel(_SIZES, file_id)
            if head is not None:
                owner = json.loads(head)["owner"]
                pipe.zrem(_k("files", owner), file_id)
                pipe.hdel(_k("sizes", owner), file_id)
            pipe.execute()

    def list_files(self, owner: str) -> list[BatchFile]:
        with _guard():
            ids = self._client.zrange(_k("files", owner), 0, -1)
            if not ids:
                return []
            pipe = self._client.pipeline(transaction=False)
            for file_id in ids:
                pipe.hget(_k("file", file_id.decode()), "head")
            heads = pipe.execute()
        now = time.time()
        files = (BatchFile(**json.loads(h)) for h in heads if h is not None)
        return [f for f in files if not f.expired(now)]

    def sweep(self, now: float, retention_s: int | None, keep: set[str]) -> Swept:
        """As the disk store's: files expired by `now` but those in `keep`, and batches
        that ended `retention_s` or more before it. Any replica may sweep; deleting twice
        is harmless."""
        with _guard():
            due = [i.decode() for i in self._client.zrangebyscore(_EXPIRY, "-inf", now)]
            old = [] if retention_s is None else [i.decode() for i in self._client.zrangebyscore(
                _ENDED, "-inf", now - retention_s)]
        files = [f for f in due if f not in keep]
        for file_id in files:
            self.delete_file(file_id)
        for batch_id in old:
            self.delete_batch(batch_id)
        with _guard():
            self.reconcile_sizes()
        return Swept(files, old)

    # --- batches -----------------------------------------------------------------------
    def save_batch(self, batch_id: str, data: bytes, version: int) -> None:
        """Replace the record unless another replica holds the batch (LeaseLost: this one
        lost it, its snapshot is stale). `version` orders one process's saves on disk; here
        every save of a holder runs in order on its own, and only the holder saves."""
        batch = json.loads(data)
        with _guard():
            saved = self._scripts["save"](
                keys=[_k("lease", batch_id), _k("rec", batch_id),
                      _k("owner", batch.get("_owner", "")), _OPEN,
                      _k("cancel", batch_id), _ENDED],
                args=[self.token, data, batch_id, _created_us(batch),
                      ended_at(batch) if batch["status"] in TERMINAL else ""])
        if not saved:
            raise LeaseLost(batch_id)

    def load_batches(self) -> Iterator[dict[str, Any]]:
        """The unfinished batches (the ones a runner may claim)."""
        with _guard():
            ids = sorted(i.decode() for i in self._client.smembers(_OPEN))
        for batch_id in ids:
            batch = self.load_batch(batch_id)
            if batch is not None:
                yield batch

    def load_batch(self, batch_id: str) -> dict[str, Any] | None:
        """The record as the API shows it: cancelling already if a cancel was asked on a
        replica that does not run it (the holder sees the request on its next tick)."""
        with _guard():
            pipe = self._client.pipeline(transaction=False)
            pipe.get(_k("rec", batch_id))
            pipe.get(_k("cancel", batch_id))
            raw, asked = pipe.execute()
        if raw is None:
            return None
        batch: dict[str, Any] = json.loads(raw)
        if asked is not None and batch["status"] in ("validating", "in_progress"):
            batch["status"] = "cancelling"
            batch["cancelling_at"] = int(asked)
        return batch

    def delete_batch(self, batch_id: str) -> None:
        """Forget a finished batch: its record, results, image copies and cancel flag."""
        with _guard():
            raw = self._client.get(_k("rec", batch_id))
            pipe = self._client.pipeline()
            pipe.delete(_k("rec", batch_id), _k("results", batch_id), _k("images", batch_id),
                        _k("cancel", batch_id))
            pipe.zrem(_ENDED, batch_id)
            if raw is not None:
                pipe.zrem(_k("owner", json.loads(raw).get("_owner", "")), batch_id)
            pipe.execute()

    def open_count(self, owner: str) -> int:
        """How many of the owner's batches have not ended (on any replica)."""
        with _guard():
            ids = self._client.zrange(_k("owner", owner), 0, -1)
            return sum(self._client.smismember(_OPEN, ids)) if ids else 0

    def list_batches(self, owner: str) -> list[dict[str, Any]]:
        with _guard():
            ids = [i.decode() for i in self._client.zrange(_k("owner", owner), 0, -1)]
        found = (self.load_batch(batch_id) for batch_id in ids)
        return [b for b in found if b is not None]

    # --- images a batch references -------------------------------------------------------
    def save_image(self, batch_id: str, meta: dict[str, Any], rgb: bytes) -> None:
        with _guard():
            self._client.hset(_k("images", batch_id), mapping={
                meta["id"]: json.dumps(meta), f"{meta['id']}.rgb": rgb})

    def load_images(self, batch_id: str) -> Iterator[tuple[dict[str, Any], bytes]]:
        with _guard():
            fields = self._client.hgetall(_k("images", batch_id))
        for name, value in sorted(fields.items()):
            if not name.endswith(b".rgb") and name + b".rgb" in fields:
                yield json.loads(value), bytes(fields[name + b".rgb"])

    def drop_images(self, batch_id: str) -> None:
        with _guard():
            self._client.delete(_k("images", batch_id))

    # --- results -------------------------------------------------------------------------
    def append_result(self, batch_id: str, result: dict[str, Any]) -> None:
        """Append one finished request, atomically with the check that this replica still
        holds the batch; LeaseLost otherwise (the line's answer is dropped, never doubled)."""
        self.append_results(batch_id, [result])

    def append_results(self, batch_id: str, results: list[dict[str, Any]]) -> None:
        """Append several in one script: all or none, one round trip."""
        lines = [json.dumps(r, separators=(",", ":")) for r in results]
        with _guard():
            kept = self._scripts["append"](
                keys=[_k("lease", batch_id), _k("results", batch_id)],
                args=[self.token, *lines])
        if not kept:
            raise LeaseLost(batch_id)

    def read_results(self, batch_id: str) -> list[dict[str, Any]]:
        with _guard():
            raw = self._client.lrange(_k("results", batch_id), 0, -1)
        return [json.loads(line) for line in raw]

    def drop_results(self, batch_id: str) -> None:
        """Once the output and error files hold them (the final status is saved)."""
        with _guard():
            self._client.delete(_k("results", batch_id))

    # --- leases and cancel requests ------------------------------------------------------
    def claim(self, batch_id: str, ttl_s: float) -> bool:
        with _guard():
            return bool(self._client.set(_k("lease", batch_id), self.token, nx=True,
                                         px=int(ttl_s * 1000)))

    def renew(self, batch_ids: list[str], ttl_s: float) -> list[str]:
        """Extend this replica's leases; the ids whose lease another replica holds now."""
        lost = []
        with _guard():
            for batch_id in batch_ids:
                if not self._scripts["renew"](keys=[_k("lease", batch_id)],
                                              args=[self.token, int(ttl_s * 1000)]):
                    lost.append(batch_id)
        return lost

    def release(self, batch_id: str) -> None:
        with _guard():
            self._scripts["release"](keys=[_k("lease", batch_id)], args=[self.token])

    def holder(self, batch_id: str) -> str | None:
        with _guard():
            value = self._client.get(_k("lease", batch_id))
        return value.decode() if value is not None else None

    def request_cancel(self, batch_id: str) -> bool:
        """Ask whichever replica runs the batch to cancel it; False if it already ended."""
        with _guard():
            return bool(self._scripts["cancel"](keys=[_OPEN, _k("cancel", batch_id)],
                                                args=[batch_id, int(time.time())]))

    def cancels_requested(self, batch_ids: list[str]) -> set[str]:
        if not batch_ids:
            return set()
        with _guard():
            flags = self._client.mget([_k("cancel", b) for b in batch_ids])
        return {b for b, flag in zip(batch_ids, flags, strict=True) if flag is not None}


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """A Redis that cannot be reached is StateUnavailable (the API answers 503)."""
    try:
        yield
    except RedisError as exc:
        raise StateUnavailable(f"the shared state store did not answer "
                               f"({type(exc).__name__}: {exc})") from None


def _k(kind: str, name: str) -> str:
    return f"{PREFIX}{kind}:{name}"


def _created_us(batch: dict[str, Any]) -> int:
    return int(batch.get("_created_us", batch["created_at"] * 1_000_000))


BatchStorage = BatchStore | RedisBatchStore


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]

