"""What batch files may take (batch_store_mb, batch_max_files and each key's share) and how
many batches a key may have open (batch_max_open_per_key). Without them one client
uploading in a loop filled the server's disk. On the real server with the openai SDK, and
on both stores (a directory, a real Redis shared by two replicas)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import redis as redis_client
from conftest import RunningServer, start_server, stop_server
from helpers import photo_bytes
from openai.types import Batch
from redis_server import RedisServer
from test_batches import jsonl, read_lines, request_line, upload_batch

from server.batches import views
from server.batches.job import BatchJob, new_batch, set_status
from server.batches.quota import FileQuota, QuotaExceeded, Usage, batch_file_quota
from server.batches.redis_store import RedisBatchStore
from server.batches.store import BatchStore
from server.config import Settings
from server.demo_model import DemoModelPaths

MIB = 1024 * 1024


def sdk(server: RunningServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key=key, max_retries=0, timeout=60)


def lines_of(size: int, tag: str) -> bytes:
    """A valid batch input file of about `size` bytes (never run: long prompts)."""
    line = request_line(tag, [{"role": "user", "content": "x" * 2000}])
    count = max(1, size // (len(jsonl([line]))))
    return jsonl([request_line(f"{tag}-{i}", [{"role": "user", "content": "x" * 2000}])
                  for i in range(count)])


def wait_ended(client: openai.OpenAI, batch_id: str, timeout: float = 120) -> Batch:
    """The batch once it has ended (as its key sees it)."""
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in (
            "completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)
    return batch


def small(tag: str) -> bytes:
    return jsonl([request_line(tag, [{"role": "user", "content": "hi"}])])


def refusal(caught: pytest.ExceptionInfo[openai.APIStatusError]) -> dict[str, object]:
    """The error object of the answer (the SDK's `body`)."""
    body = caught.value.body
    assert isinstance(body, dict), body
    return body


# ---------- the rule and the shares ----------

def test_a_keys_share_is_an_even_split_unless_set() -> None:
    settings = Settings(api_keys=["a", "b", "c", "d"], batch_store_mb=400, batch_max_files=40)
    assert batch_file_quota(settings) == FileQuota(40, 400 * MIB, 10, 100 * MIB)
    assert batch_file_quota(settings, keys=8) == FileQuota(40, 400 * MIB, 5, 50 * MIB)
    explicit = Settings(batch_store_mb=400, batch_store_mb_per_key=300,
                        batch_max_files_per_key=30)
    assert batch_file_quota(explicit, keys=8) == FileQuota(10_000, 400 * MIB, 30, 300 * MIB)


def test_the_store_is_smaller_by_default_where_it_takes_memory() -> None:
    assert batch_file_quota(Settings()).max_bytes == 20 * 1024 * MIB  # on disk
    shared = Settings(state_url="redis://127.0.0.1:6379/0")
    assert batch_file_quota(shared).max_bytes == 1024 * MIB  # in Redis
    assert batch_file_quota(Settings(state_url="redis://127.0.0.1:6379/0", batch_store_mb=5)
                            ).max_bytes == 5 * MIB


def test_the_owners_share_is_checked_before_the_store() -> None:
    quota = FileQuota(max_files=10, max_bytes=1000, max_files_per_owner=3,
                      max_bytes_per_owner=500)
    assert quota.refusal(100, Usage(2, 400), Usage(9, 800)) is None
    for owner in (Usage(3, 10), Usage(1, 401)):  # one file too many, one byte too many
        refused = quota.refusal(100, owner, Usage(3, 411))
        assert refused is not None and not refused.whole_store
    refused = quota.refusal(100, Usage(0, 0), Usage(10, 10))
    assert refused is not None and refused.whole_store
    assert "take 10 file(s), 10 bytes" in str(refused)
    assert "of at most 10 files and 1,000 bytes; this upload (100 bytes)" in str(refused)
    refused = quota.refusal(501, Usage(0, 0), Usage(0, 0))  # no deleting makes room for it
    assert refused is not None and refused.too_large and not refused.whole_store
    assert "larger than all this key's batch files may take (500 bytes)" in str(refused)


# ---------- both stores ----------

@pytest.fixture(params=["disk", "redis"])
def store_pair(request: pytest.FixtureRequest, tmp_path: Path
               ) -> Iterator[tuple[BatchStore | RedisBatchStore, ...]]:
    """Two handles on one store: one directory, or two replicas on one Redis."""
    if request.param == "disk":
        yield BatchStore(tmp_path), BatchStore(tmp_path)
        return
    redis: RedisServer = request.getfixturevalue("redis")
    redis_client.Redis(port=redis.port, db=3).flushdb()
    pair = (RedisBatchStore(redis.url(3), "one"), RedisBatchStore(redis.url(3), "two"))
    yield pair
    for store in pair:
        store.close()


def test_uploads_past_a_share_or_the_store_are_refused_and_outputs_never(
        store_pair: tuple[BatchStore | RedisBatchStore, ...]) -> None:
    one, two = store_pair
    quota = FileQuota(max_files=3, max_bytes=100, max_files_per_owner=2,
                      max_bytes_per_owner=60)
    first = one.add_file("a.jsonl", "batch", b"x" * 40, "a", quota=quota)
    with pytest.raises(QuotaExceeded) as caught:  # 40 + 30 bytes > a's 60, seen by the other
        two.add_file("b.jsonl", "batch", b"x" * 30, "a", quota=quota)
    assert not caught.value.whole_store and "40 bytes" in str(caught.value)
    two.add_file("b.jsonl", "batch", b"x" * 20, "a", quota=quota)
    with pytest.raises(QuotaExceeded):  # a third file: past a's 2 files
        one.add_file("c.jsonl", "batch", b"x", "a", quota=quota)
    one.add_file("d.jsonl", "batch", b"x" * 30, "b", quota=quota)  # b's own share
    with pytest.raises(QuotaExceeded) as caught:  # b has room, the store has not (3 files)
        two.add_file("e.jsonl", "batch", b"x", "b", quota=quota)
    assert caught.value.whole_store
    # A batch's output is finished work: kept past every bound, and counted.
    one.add_file("out.jsonl", "batch_output", b"y" * 50, "a")
    assert two.usage("a") == (Usage(3, 110), Usage(4, 140))
    assert one.usage("nobody") == (Usage(0, 0), Usage(4, 140))
    # Deleting (or the sweep's expiry) gives the room back, to either handle.
    one.delete_file(first.id)
    one.delete_file(first.id)  # twice: counted off once
    assert two.usage("a") == (Usage(2, 70), Usage(3, 100))


def test_a_rewritten_output_counts_once_and_the_sweep_gives_room_back(
        store_pair: tuple[BatchStore | RedisBatchStore, ...]) -> None:
    one, two = store_pair
    quota = FileQuota(max_files=10, max_bytes=100, max_files_per_owner=10,
                      max_bytes_per_owner=100)
    output = one.add_file("out.jsonl", "batch_output", b"y" * 30, "a")
    two.add_file("out.jsonl", "batch_output", b"y" * 30, "a", file_id=output.id)  # a retry
    assert one.usage("a") == (Usage(1, 30), Usage(1, 30))
    expiring = two.add_file("a.jsonl", "batch", b"x" * 60, "a", ttl_s=1, quota=quota)
    with pytest.raises(QuotaExceeded):
        one.add_file("b.jsonl", "batch", b"x" * 20, "a", quota=quota)
    swept = one.sweep(expiring.expires_at + 1, None, keep=set())  # type: ignore[operator]
    assert swept.files == [expiring.id]
    assert two.usage("a") == (Usage(1, 30), Usage(1, 30))
    one.add_file("b.jsonl", "batch", b"x" * 20, "a", quota=quota)


def test_uploads_at_once_cannot_all_take_the_last_room(
        store_pair: tuple[BatchStore | RedisBatchStore, ...]) -> None:
    quota = FileQuota(max_files=3, max_bytes=10**6, max_files_per_owner=3,
                      max_bytes_per_owner=10**6)
    # On disk one process holds a directory's store; in Redis, replicas share it.
    stores = store_pair if isinstance(store_pair[0], RedisBatchStore) else store_pair[:1]

    def upload(i: int) -> bool:
        try:
            stores[i % len(stores)].add_file(f"{i}.jsonl", "batch", b"x" * 1000, "a", quota=quota)
        except QuotaExceeded:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        kept = list(pool.map(upload, range(8)))
    assert sum(kept) == 3, kept
    assert store_pair[0].usage("a")[0] == Usage(3, 3000)


def test_redis_counts_what_replicas_of_before_stored_and_deleted(redis: RedisServer) -> None:
    """An upgraded deployment: files stored before sizes were counted count from the first
    look on; through a rolling upgrade, old replicas still add files without their size
    and delete them without dropping it, and the sweep sets the counts right."""
    r = redis_client.Redis(port=redis.port, db=4)
    r.flushdb()
    old = RedisBatchStore(redis.url(4), "old")
    try:
        kept = old.add_file("a.jsonl", "batch", b"x" * 10, "a")
        gone = old.add_file("b.jsonl", "batch", b"x" * 7, "a")
        old.add_file("c.jsonl", "batch", b"x" * 5, "b")
        old.delete_file(gone.id)
    finally:
        old.close()
    # What a store of before this change left: no sizes.
    r.delete("vlserve:batches:sizes", "vlserve:batches:sizes:a", "vlserve:batches:sizes:b")
    one, two = RedisBatchStore(redis.url(4), "one"), RedisBatchStore(redis.url(4), "two")
    try:
        assert one.usage("a") == (Usage(1, 10), Usage(2, 15))
        assert two.usage("b") == (Usage(1, 5), Usage(2, 15))  # counted once, not twice
        # An old replica's add (no size) and delete (the file only, its size stays).
        r.hset("vlserve:batches:file:file-00ff", mapping={"head": json.dumps({
            "id": "file-00ff", "filename": "d.jsonl", "purpose": "batch", "bytes": 4,
            "created_us": 1, "owner": "b"}), "data": b"xxxx"})
        r.delete(f"vlserve:batches:file:{kept.id}")
        assert one.usage("a") == (Usage(1, 10), Usage(2, 15))  # not yet seen
        one.sweep(time.time(), None, keep=set())
        assert two.usage("a") == (Usage(0, 0), Usage(2, 9))
        assert two.usage("b") == (Usage(2, 9), Usage(2, 9))
    finally:
        one.close()
        two.close()


def test_redis_counts_a_keys_open_batches_on_every_replica(redis: RedisServer) -> None:
    redis_client.Redis(port=redis.port, db=5).flushdb()
    one, two = RedisBatchStore(redis.url(5), "one"), RedisBatchStore(redis.url(5), "two")
    try:
        for i, status in enumerate(["validating", "in_progress", "cancelling", "completed"]):
            one.save_batch(f"batch_{i}", json.dumps({
                "id": f"batch_{i}", "status": status, "created_at": 1, "_created_us": i,
                "_owner": "a", "completed_at": 2}).encode(), 1)
        assert two.open_count("a") == 3 and two.open_count("b") == 0
    finally:
        one.close()
        two.close()


# ---------- on the server ----------

@pytest.fixture(scope="module")
def quota_server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[RunningServer]:
    """Keys a and b: each at most 2 batch files and 1 MiB of them, 3 files in all."""
    running = start_server(
        demo_model, tmp_path_factory.mktemp("batch-quota") / "server.log",
        env={"VLSERVE_API_KEYS": "key-a,key-b", "VLSERVE_BATCH_MAX_FILES_PER_KEY": "2",
             "VLSERVE_BATCH_STORE_MB_PER_KEY": "1", "VLSERVE_BATCH_MAX_FILES": "3"})
    yield running
    stop_server(running)


def test_a_key_past_its_share_gets_413_and_room_back_when_it_deletes(
        quota_server: RunningServer) -> None:
    a, b = sdk(quota_server, "key-a"), sdk(quota_server, "key-b")
    big = upload_batch(a, lines_of(600 * 1024, "big"))
    with pytest.raises(openai.APIStatusError) as caught:  # 1.2 MB of a's 1 MiB
        upload_batch(a, lines_of(600 * 1024, "again"))
    error = refusal(caught)
    assert caught.value.status_code == 413, error
    assert error["code"] == "batch_quota_exceeded" and error["param"] == "file", error
    assert "this key's batch files take 1 file(s)" in str(error["message"])
    assert "DELETE /v1/files/" in str(error["message"])
    # Image uploads are another store: the batch share does not touch them.
    a.files.create(file=("a.png", photo_bytes()), purpose="vision")
    assert a.files.delete(big.id).deleted
    upload_batch(a, lines_of(600 * 1024, "again"))
    one_line = upload_batch(a, small("small"))
    with pytest.raises(openai.APIStatusError) as caught:  # a third file
        upload_batch(a, small("third"))
    assert caught.value.status_code == 413
    assert "this key's batch files take 2 file(s)" in str(refusal(caught)["message"])
    with pytest.raises(openai.APIStatusError) as caught:  # larger than a's whole share
        upload_batch(b, lines_of(1100 * 1024, "huge"))
    assert caught.value.status_code == 413
    assert "is larger than all this key's batch files may take" in str(
        refusal(caught)["message"])
    # b's share is its own; the store's 3 files are not: b's second upload is a 507.
    upload_batch(b, small("b-first"))
    with pytest.raises(openai.InternalServerError) as full:
        upload_batch(b, small("b-second"))
    assert full.value.status_code == 507
    error = refusal(full)
    assert error["code"] == "batch_store_full", error
    assert "the server's batch files take 3 file(s)" in str(error["message"])
    assert full.value.response.headers["retry-after"] == "3600"
    # A batch of a key at its share still writes its output: finished work is kept.
    batch = a.batches.create(input_file_id=one_line.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    done = wait_ended(a, batch.id)
    assert done.status == "completed", done
    assert list(read_lines(a, done.output_file_id)) == ["small"]
    assert a.files.delete(one_line.id).deleted  # room for one file, but the output took it
    with pytest.raises(openai.APIStatusError) as caught:
        upload_batch(a, small("after"))
    assert "this key's batch files take 2 file(s)" in str(refusal(caught)["message"])


def test_a_key_with_as_many_open_batches_as_allowed_gets_429_until_one_ends(
        demo_model: DemoModelPaths, tmp_path: Path) -> None:
    server = start_server(demo_model, tmp_path / "server.log", "--n-parallel", "1",
                          env={"VLSERVE_API_KEYS": "key-a,key-b",
                               "VLSERVE_BATCH_MAX_OPEN_PER_KEY": "1",
                               "VLSERVE_BATCH_IN_FLIGHT": "1",
                               "VLSERVE_MAX_TOKENS_CAP": "256"})
    try:
        a, b = sdk(server, "key-a"), sdk(server, "key-b")
        # 200 lines of 256 tokens: a minute of work, still open when the next create comes.
        long_file = upload_batch(a, jsonl([request_line(
            f"l{i}", [{"role": "user", "content": "go"}], max_tokens=256, ignore_eos=True)
            for i in range(200)]))
        short_file = upload_batch(a, small("s"))


        def create() -> Batch | openai.RateLimitError:
            try:
                return a.batches.create(input_file_id=long_file.id,
                                        endpoint="/v1/chat/completions",
                                        completion_window="24h")
            except openai.RateLimitError as refused:
                return refused

        with ThreadPoolExecutor(6) as pool:  # at once: only one may pass
            created = list(pool.map(lambda _: create(), range(6)))
        [running] = [c for c in created if isinstance(c, Batch)]
        with pytest.raises(openai.RateLimitError) as caught:
            a.batches.create(input_file_id=short_file.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
        error = refusal(caught)
        assert error["code"] == "too_many_open_batches", error
        assert "this key has 1 batches that have not ended" in str(error["message"])
        # Another key's batches are its own count.
        b_file = upload_batch(b, small("s"))
        b.batches.create(input_file_id=b_file.id, endpoint="/v1/chat/completions",
                         completion_window="24h")
        a.batches.cancel(running.id)
        assert wait_ended(a, running.id).status == "cancelled"
        later = a.batches.create(input_file_id=short_file.id,
                                 endpoint="/v1/chat/completions", completion_window="24h")
        assert wait_ended(a, later.id).status == "completed"
    finally:
        stop_server(server)


def test_a_batch_that_ended_is_not_open_while_its_job_tidies_up() -> None:
    """The runner keeps a job a moment after setting its batch's final status (it saves
    the record, then forgets the job): a key told "cancelled" must be able to create the
    next batch at once."""
    ended = new_batch("key-a", "file-1", "/v1/chat/completions", "24h", None)
    set_status(ended, "cancelled")
    running = new_batch("key-a", "file-2", "/v1/chat/completions", "24h", None)
    runner = SimpleNamespace(store=object(), jobs={b["id"]: BatchJob(b)
                                                   for b in (ended, running)})
    assert asyncio.run(views.open_count(runner, "key-a")) == 1  # type: ignore[arg-type]
    assert asyncio.run(views.open_count(runner, "key-b")) == 0  # type: ignore[arg-type]
