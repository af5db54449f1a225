"""Batches on the shared store (issue 16): two `vlserve serve` replicas on one Redis
(state_url). A batch created on one is read, listed and downloaded on the other; a cancel
sent to the replica that does not run it stops it; a replica killed with -9 loses its
lease after batch_lease_s and the other resumes the batch from the results log in Redis,
each line answered exactly once; one stopped with SIGTERM hands it over at once; a replica
whose lease is taken stops its lines there."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import redis as redis_client
from conftest import RunningServer, start_server, stop_server
from helpers import photo_bytes
from redis_server import RedisServer, start_redis
from test_batches import (
    create_batch,
    jsonl,
    raw_batch,
    read_lines,
    request_line,
    wait_batch,
)

from server.batches.redis_store import LeaseLost, RedisBatchStore
from server.demo_model import DemoModelPaths

LEASE_S = 3.0  # small, so a takeover is quick; every wait below is for an event, not a time
PREFIX = "vlserve:batches:"
# Generated tokens per batch line (ignore_eos): ~0.2 s each on the demo model, so a batch
# of 12-40 lines is still running when the test steps in after its first results.
TOKENS = 1000


def start_pair(demo_model: DemoModelPaths, redis: RedisServer, db: int, logs: str,
               tmp_path_factory: pytest.TempPathFactory, tokens: int,
               lease_s: float = LEASE_S) -> list[RunningServer]:
    """Replicas a and b on Redis database `db`, one slot and one batch line at a time each
    (so a batch is mid-way for a while)."""
    folder = tmp_path_factory.mktemp(logs)
    started: list[RunningServer] = []
    try:
        for name in ("a", "b"):
            env = {"VLSERVE_STATE_URL": redis.url(db), "VLSERVE_REPLICA_ID": name,
                   "VLSERVE_BATCH_LEASE_S": str(lease_s), "VLSERVE_BATCH_IN_FLIGHT": "1",
                   "VLSERVE_MAX_TOKENS_CAP": str(tokens),
                   # Each its own disk folder: were anything still on disk, B could not see it.
                   "VLSERVE_BATCH_DIR": str(folder / f"{name}-batches")}
            started.append(start_server(demo_model, folder / f"{name}.log", "--n-parallel",
                                        "1", env=env))
    except BaseException:
        for server in started:
            stop_server(server)
        raise
    return started


@pytest.fixture(scope="module")
def replicas(demo_model: DemoModelPaths, redis: RedisServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningServer]]:
    pair = start_pair(demo_model, redis, 0, "batch-replicas", tmp_path_factory, TOKENS)
    yield pair
    for server in pair:
        stop_server(server)


def sdk(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=60)


def db(redis: RedisServer, number: int = 0) -> redis_client.Redis:
    return redis_client.Redis(port=redis.port, db=number)


def long_lines(n: int, tokens: int) -> list[dict]:
    return [request_line(f"line-{i}", [{"role": "user", "content": f"Count {i}"}],
                         max_tokens=tokens, ignore_eos=True) for i in range(n)]


def holder_of(r: redis_client.Redis, batch_id: str, results: int = 1,
              timeout: float = 120) -> str:
    """The replica (a or b) running the batch, once `results` lines are logged in Redis."""
    deadline = time.monotonic() + timeout
    while True:
        lease = r.get(f"{PREFIX}lease:{batch_id}")
        if lease is not None and r.llen(f"{PREFIX}results:{batch_id}") >= results:
            return lease.decode().split("-", 1)[0]
        assert time.monotonic() < deadline, "no replica made progress on the batch"
        time.sleep(0.01)


def wait_log(server: RunningServer, pattern: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, server.log()):
        assert time.monotonic() < deadline, f"{pattern!r} never logged"
        time.sleep(0.05)


def ran_here(server: RunningServer, batch_id: str) -> int:
    """Batch lines this replica answered (its request log names each `<batch>:<line>`)."""
    return sum(1 for line in server.log().splitlines()
               if '"event": "chat_completion"' in line and f'"{batch_id}:' in line)


# ---------- two replicas, one Redis ----------

def test_a_batch_made_on_one_replica_is_read_listed_and_downloaded_on_the_other(
        replicas: list[RunningServer], redis: RedisServer) -> None:
    a, b = (sdk(r) for r in replicas)
    image = a.files.create(file=("cat.png", io.BytesIO(photo_bytes(seed=16))),
                           purpose="vision")
    lines = [request_line("text", [{"role": "user", "content": "Hello"}]),
             request_line("picture", [{"role": "user", "content": [
                 {"type": "text", "text": "What is it?"},
                 {"type": "file", "file": {"file_id": image.id}}]}])]
    uploaded = a.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    # The input file is in Redis: B lists it and serves its bytes.
    assert uploaded.id in {f.id for f in b.files.list()}
    assert b.files.content(uploaded.id).content == jsonl(lines)
    made = a.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                            completion_window="24h", metadata={"where": "a"})
    assert b.batches.retrieve(made.id).metadata == {"where": "a"}
    assert made.id in [x.id for x in b.batches.list()]
    done = wait_batch(replicas[1], made.id, {"completed", "failed"})
    assert done.status == "completed", done
    assert done.request_counts is not None and done.request_counts.completed == 2
    outputs = read_lines(b, done.output_file_id)  # downloaded on B, whoever ran it
    assert set(outputs) == {"text", "picture"}
    assert outputs["picture"]["response"]["body"]["timings"]["image_tokens"] > 0
    assert a.files.content(done.output_file_id).content == \
        b.files.content(done.output_file_id).content
    # Exactly one replica ran it; at the end the lease, results log and images are gone.
    assert ran_here(replicas[0], made.id) + ran_here(replicas[1], made.id) == 2
    r = db(redis)
    assert not r.exists(f"{PREFIX}lease:{made.id}", f"{PREFIX}results:{made.id}",
                        f"{PREFIX}images:{made.id}")
    assert not r.sismember(f"{PREFIX}open", made.id)
    # Nothing on either replica's own disk: all of it lives in Redis.
    assert not any((r.log_path.parent / f"{name}-batches").exists()
                   for r, name in zip(replicas, "ab", strict=True))
    assert b.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(uploaded.id)


def test_deleting_a_running_batchs_input_on_the_other_replica_keeps_its_bytes(
        replicas: list[RunningServer], redis: RedisServer) -> None:
    """The replica answering the DELETE sees the batch another one runs (the open set in
    Redis): the file is gone for its owner, its bytes stay for the batch to resume from."""
    by_name = {"a": replicas[0], "b": replicas[1]}
    batch = create_batch(sdk(replicas[0]), long_lines(12, TOKENS))
    running = holder_of(db(redis), batch.id)
    other = sdk(by_name["b" if running == "a" else "a"])
    assert other.files.delete(batch.input_file_id).deleted
    for replica in replicas:
        with pytest.raises(openai.NotFoundError):
            sdk(replica).files.retrieve(batch.input_file_id)
    assert batch.input_file_id not in {f.id for f in other.files.list()}
    assert db(redis).hexists(f"{PREFIX}file:{batch.input_file_id}", "data")
    other.batches.cancel(batch.id)
    done = wait_batch(replicas[0], batch.id, {"cancelled", "completed"})
    assert done.request_counts is not None and done.request_counts.completed >= 1


def test_a_cancel_sent_to_the_other_replica_stops_the_batch(
        replicas: list[RunningServer], redis: RedisServer) -> None:
    by_name = {"a": replicas[0], "b": replicas[1]}
    batch_id = create_batch(sdk(replicas[0]), long_lines(40, TOKENS)).id
    running = holder_of(db(redis), batch_id)
    holder = by_name[running]
    other = by_name["b" if running == "a" else "a"]
    cancelled = sdk(other).batches.cancel(batch_id)
    assert cancelled.status == "cancelling" and cancelled.cancelling_at
    # The holder sees the request on its next tick and stops the line it is running.
    done = wait_batch(other, batch_id, {"cancelled", "completed", "failed"}, timeout=60)
    assert done.status == "cancelled", done
    wait_log(holder, f"batch {batch_id} cancelling")
    assert done.request_counts is not None and 1 <= done.request_counts.completed < 40
    outputs = read_lines(sdk(other), done.output_file_id)
    assert len(outputs) == done.request_counts.completed
    assert raw_batch(holder, batch_id).status == "cancelled"
    assert ran_here(other, batch_id) == 0  # the replica asked to cancel never ran a line


def test_a_replica_whose_lease_is_taken_stops_its_lines_there(
        replicas: list[RunningServer], redis: RedisServer) -> None:
    by_name = {"a": replicas[0], "b": replicas[1]}
    r = db(redis)
    lines = 12
    batch_id = create_batch(sdk(replicas[1]), long_lines(lines, TOKENS)).id
    holder = by_name[holder_of(r, batch_id)]
    lease = f"{PREFIX}lease:{batch_id}"
    r.set(lease, "intruder", px=600_000)  # as if another replica had claimed it
    wait_log(holder, f"batch {batch_id}: its lease is held by another replica now")
    logged = r.llen(f"{PREFIX}results:{batch_id}")
    assert logged < lines, "the batch finished before the lease was taken: lengthen lines"
    # The holder dropped the batch (no line of it started there again) and the store
    # refuses anything it would still append: nothing is added while the lease is not its.
    time.sleep(LEASE_S)  # longer than a line takes: had it carried on, one would show
    assert r.llen(f"{PREFIX}results:{batch_id}") == logged
    assert raw_batch(holder, batch_id).status == "in_progress"
    r.delete(lease)  # the intruder "dies": a replica claims it and finishes it
    done = wait_batch(holder, batch_id, {"completed", "failed"})
    assert done.status == "completed", done
    outputs = read_lines(sdk(holder), done.output_file_id)  # each custom_id once
    assert set(outputs) == {f"line-{i}" for i in range(lines)}


# ---------- a replica killed mid-batch ----------

def test_kill_9_of_the_running_replica_hands_the_batch_to_the_other(
        demo_model: DemoModelPaths, redis: RedisServer,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    lines, tokens = 20, TOKENS
    pair = start_pair(demo_model, redis, 1, "batch-takeover", tmp_path_factory, tokens)
    by_name = {"a": pair[0], "b": pair[1]}
    try:
        client = sdk(pair[0])
        # The last line names an uploaded image: the replica taking over reads the copy the
        # batch kept in Redis.
        image = client.files.create(file=("cat.png", io.BytesIO(photo_bytes(seed=17))),
                                    purpose="vision")
        picture = [{"role": "user", "content": [
            {"type": "text", "text": "What is it?"},
            {"type": "file", "file": {"file_id": image.id}}]}]
        items = [*long_lines(lines - 1, tokens), request_line(
            f"line-{lines - 1}", picture, max_tokens=8)]
        batch_id = create_batch(client, items).id
        r = db(redis, 1)
        running = holder_of(r, batch_id, results=3)
        dead, survivor = by_name[running], by_name["b" if running == "a" else "a"]
        os.kill(dead.process.pid, signal.SIGKILL)
        dead.process.wait(timeout=30)
        before = {json.loads(x)["custom_id"]: json.loads(x)
                  for x in r.lrange(f"{PREFIX}results:{batch_id}", 0, -1)}
        assert 3 <= len(before) < lines, "the batch finished before the kill: longer lines"
        done = wait_batch(survivor, batch_id, {"completed", "failed"}, timeout=180)
        assert done.status == "completed", done
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed) == (lines, lines)
        outputs = read_lines(sdk(survivor), done.output_file_id)  # each custom_id once
        assert set(outputs) == {f"line-{i}" for i in range(lines)}
        for custom_id, result in before.items():  # finished before the kill: not run again
            assert outputs[custom_id]["id"] == result["id"]
        assert all(outputs[f"line-{i}"]["response"]["body"]["usage"]["completion_tokens"]
                   == tokens for i in range(lines - 1))
        assert outputs[f"line-{lines - 1}"]["response"]["body"]["timings"]["image_tokens"] > 0
        assert f"batch {batch_id} claimed by {'b' if running == 'a' else 'a'}-" in \
            survivor.log()
        assert ran_here(survivor, batch_id) == lines - len(before)
        assert not r.exists(f"{PREFIX}images:{batch_id}", f"{PREFIX}results:{batch_id}")
    finally:
        for server in pair:
            stop_server(server)


def test_a_replica_stopped_gracefully_hands_its_batch_over_at_once(
        demo_model: DemoModelPaths, redis: RedisServer,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """SIGTERM: the holder hands its lease back as it stops, so the other replica claims the
    batch on its next tick, not after the TTL (long here: 120 s)."""
    lines = 12
    pair = start_pair(demo_model, redis, 3, "batch-handover", tmp_path_factory, TOKENS,
                      lease_s=120)
    by_name = {"a": pair[0], "b": pair[1]}
    try:
        batch_id = create_batch(sdk(pair[1]), long_lines(lines, TOKENS)).id
        r = db(redis, 3)
        running = holder_of(r, batch_id)
        stopping, survivor = by_name[running], by_name["b" if running == "a" else "a"]
        stopping.process.send_signal(signal.SIGTERM)
        stopping.process.wait(timeout=30)
        lease = r.get(f"{PREFIX}lease:{batch_id}")  # released, or the survivor's already
        assert lease is None or not lease.decode().startswith(f"{running}-")
        done = wait_batch(survivor, batch_id, {"completed", "failed"}, timeout=60)
        assert done.status == "completed", done
        assert len(read_lines(sdk(survivor), done.output_file_id)) == lines
        assert f"batch {batch_id} claimed by {survivor.log_path.stem}-" in survivor.log()
    finally:
        for server in pair:
            stop_server(server)


# ---------- the store's fencing, on a real Redis ----------

@pytest.fixture
def stores(redis: RedisServer) -> Iterator[tuple[RedisBatchStore, RedisBatchStore]]:
    db(redis, 2).flushdb()
    pair = (RedisBatchStore(redis.url(2), "one"), RedisBatchStore(redis.url(2), "two"))
    yield pair
    for store in pair:
        store.close()


def record(batch_id: str, status: str = "in_progress") -> bytes:
    return json.dumps({"id": batch_id, "status": status, "created_at": 1,
                       "_created_us": 1_000_000, "_owner": "me"}).encode()


def test_only_the_lease_holder_appends_results_or_saves_the_record(
        stores: tuple[RedisBatchStore, RedisBatchStore], redis: RedisServer) -> None:
    one, two = stores
    one.save_batch("batch_x", record("batch_x", "validating"), 1)  # the creator: no lease yet
    assert one.claim("batch_x", 30) and not two.claim("batch_x", 30)
    one.append_result("batch_x", {"_i": 0, "custom_id": "a"})
    with pytest.raises(LeaseLost):
        two.append_result("batch_x", {"_i": 0, "custom_id": "a"})  # a second answer: refused
    with pytest.raises(LeaseLost):
        two.save_batch("batch_x", record("batch_x", "cancelled"), 9)
    assert [r["custom_id"] for r in one.read_results("batch_x")] == ["a"]
    assert two.load_batch("batch_x")["status"] == "validating"  # type: ignore[index]
    # The lease passes on (the holder died: here, its key expired): the old holder's
    # renewal reports it lost and its writes are refused from then on.
    db(redis, 2).delete(f"{PREFIX}lease:batch_x")
    assert two.claim("batch_x", 30)
    assert one.renew(["batch_x"], 30) == ["batch_x"] and two.renew(["batch_x"], 30) == []
    with pytest.raises(LeaseLost):
        one.append_result("batch_x", {"_i": 1, "custom_id": "b"})
    two.append_result("batch_x", {"_i": 1, "custom_id": "b"})
    assert [r["custom_id"] for r in two.read_results("batch_x")] == ["a", "b"]


def test_an_expired_file_is_hidden_but_its_bytes_stay_for_the_batch_reading_it(
        stores: tuple[RedisBatchStore, RedisBatchStore]) -> None:
    one, two = stores
    record = one.add_file("in.jsonl", "batch", b"data\n", "me", ttl_s=None)
    now = time.time()
    one.expire_file(record.id, now)
    assert two.get_file(record.id) is None and two.list_files("me") == []
    assert two.file_bytes(record.id) == b"data\n"  # the running batch still reads it
    assert two.sweep(now + 1, None, keep={record.id}).files == []
    assert two.file_bytes(record.id) == b"data\n"
    assert two.sweep(now + 1, None, keep=set()).files == [record.id]  # the batch ended
    with pytest.raises(FileNotFoundError):
        two.file_bytes(record.id)


def test_a_files_bytes_open_as_a_stream(stores: tuple[RedisBatchStore, RedisBatchStore]
                                        ) -> None:
    one, two = stores
    record = one.add_file("out.jsonl", "batch_output", b"a\nb\n", "me")
    with two.open_file(record.id) as stream:
        assert stream.read(2) == b"a\n" and stream.read() == b"b\n"
    one.delete_file(record.id)
    with pytest.raises(FileNotFoundError):
        two.open_file(record.id)


def test_a_cancel_asked_elsewhere_shows_at_once_and_ends_with_the_batch(
        stores: tuple[RedisBatchStore, RedisBatchStore]) -> None:
    one, two = stores
    one.save_batch("batch_y", record("batch_y"), 1)
    assert one.claim("batch_y", 30)
    assert two.request_cancel("batch_y")
    assert two.load_batch("batch_y")["status"] == "cancelling"  # type: ignore[index]
    assert [b["status"] for b in two.list_batches("me")] == ["cancelling"]
    assert one.cancels_requested(["batch_y", "batch_other"]) == {"batch_y"}
    one.save_batch("batch_y", record("batch_y", "cancelled"), 2)  # the final save
    assert one.cancels_requested(["batch_y"]) == set()
    assert list(two.load_batches()) == []  # nothing left to claim
    assert not two.request_cancel("batch_y")  # too late: it ended
    assert two.load_batch("batch_y")["status"] == "cancelled"  # type: ignore[index]


# ---------- Redis going away ----------

def test_batch_routes_answer_503_while_redis_is_away_then_recover(
        demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory) -> None:
    own = start_redis(tmp_path_factory.mktemp("redis-batches-away"))
    server = start_server(demo_model, tmp_path_factory.mktemp("away") / "server.log",
                          env={"VLSERVE_STATE_URL": own.url(0), "VLSERVE_STATE_TIMEOUT_S": "2",
                               "VLSERVE_BATCH_LEASE_S": str(LEASE_S)})
    try:
        client = sdk(server)
        hello = request_line("one", [{"role": "user", "content": "Hi"}])
        batch_id = create_batch(client, [hello]).id
        assert wait_batch(server, batch_id, {"completed"}).status == "completed"
        own.stop()
        data = jsonl([request_line("x", [{"role": "user", "content": "Hi"}])])
        for method, path, kw in [
                ("GET", f"/batches/{batch_id}", {}), ("GET", "/batches", {}),
                ("POST", f"/batches/{batch_id}/cancel", {}),
                ("POST", "/batches", {"json": {"input_file_id": "file-00",
                                               "endpoint": "/v1/chat/completions",
                                               "completion_window": "24h"}}),
                ("POST", "/files", {"files": {"file": ("in.jsonl", data)},
                                    "data": {"purpose": "batch"}})]:
            started = time.monotonic()
            answer = httpx.request(method, f"{server.api}{path}", timeout=60, **kw)
            assert answer.status_code == 503, (path, answer.text)
            error = answer.json()["error"]
            assert error["code"] == "state_store_unavailable" and "batches" in error["message"]
            assert "redis" not in error["message"].lower()
            assert time.monotonic() - started < 15, f"{method} {path} waited too long"
        # The replica itself is fine; its runner says why it is idle, once a tick.
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        wait_log(server, "the batch runner cannot reach the shared store")
    finally:
        own.start()  # empty, same port: the clients reconnect by themselves
    try:
        hello = request_line("two", [{"role": "user", "content": "Hi"}])
        batch_id = create_batch(sdk(server), [hello]).id
        assert wait_batch(server, batch_id, {"completed"}).status == "completed"
    finally:
        stop_server(server)
        own.stop()
