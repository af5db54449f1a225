"""Batch jobs' pure logic: input lines, the engine's priority order, the results log.
(The server-level behaviour is in test_batches*.py, on the real engine.)"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from server.batches.lines import parse, referenced_files
from server.batches.offline import Progress
from server.batches.store import BatchStore
from server.engine.admission import Inbox, Pending, QueueFullError, outranked
from server.engine.types import BATCH_PRIORITY, GenerationRequest

ENDPOINT = "/v1/chat/completions"


def line(custom_id: str, **extra: Any) -> bytes:
    item = {"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
            "body": {"messages": []}, **extra}
    return json.dumps(item).encode()


def test_parse_keeps_good_lines_and_says_why_bad_ones_fail() -> None:
    data = b"\n".join([line("a"), b"", b"[1]", line("b", method="GET"),
                       line("c", url="/v1/embeddings"), line("d", body="x"),
                       line("e", body={"stream": True}), b'{"custom_id": 5}'])
    lines, problems = parse(data, ENDPOINT, 100)
    assert problems == []
    assert [(x.index, x.custom_id, x.error) for x in lines] == [
        (0, "a", None), (1, None, "the line is not a JSON object"),
        (2, "b", 'method must be "POST"'),
        (3, "c", "url must be the batch's endpoint '/v1/chat/completions', not "
                 "'/v1/embeddings'"),
        (4, "d", "body must be a JSON object"), (5, "e", "stream is not supported in a batch"),
        (6, None, "custom_id must be a non-empty string")]


def test_parse_fails_the_file_for_duplicates_limits_and_encoding() -> None:
    assert parse(line("a") + b"\n" + line("a"), ENDPOINT, 10)[1][0].code == \
        "duplicate_custom_id"
    assert "3 request lines; at most 2" in parse(b"\n".join([line("a"), line("b"),
                                                             line("c")]), ENDPOINT, 2)[1][0].message
    assert parse(b"\xff\xfe", ENDPOINT, 10)[1][0].message == "the batch file is not UTF-8 text"
    assert parse(b"\n \n", ENDPOINT, 10)[1][0].message == "the batch file has no request lines"


def test_referenced_files() -> None:
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}, {"type": "file", "file": {"file_id": "file-1"}}]},
        {"role": "user", "content": "plain"}, "junk"]}
    assert referenced_files(body) == {"file-1"}


def pending(priority: int) -> Pending:
    request = GenerationRequest(messages=[], max_tokens=1, priority=priority)
    return Pending(request, prompt=None, sink=None)  # type: ignore[arg-type]


def test_inbox_serves_interactive_before_batch_and_fifo_within_each() -> None:
    inbox = Inbox()
    batch1, batch2, chat1, chat2 = (pending(BATCH_PRIORITY), pending(BATCH_PRIORITY),
                                    pending(0), pending(0))
    for item in (batch1, batch2, chat1, chat2):
        inbox.put(item, limit=10)
    assert inbox.head() is chat1
    assert [inbox.get(0) for _ in range(4)] == [chat1, chat2, batch1, batch2]
    inbox.put(batch1, limit=10)
    assert inbox.get(0, accept=lambda p: False) is None and inbox.head() is batch1


def test_waiting_batch_lines_do_not_fill_the_queue_for_chats() -> None:
    inbox = Inbox()
    for _ in range(3):
        inbox.put(pending(BATCH_PRIORITY), limit=3)
    with pytest.raises(QueueFullError):
        inbox.put(pending(BATCH_PRIORITY), limit=3)
    for _ in range(3):
        inbox.put(pending(0), limit=3)
    with pytest.raises(QueueFullError):
        inbox.put(pending(0), limit=3)


def slot(priority: int | None, order: int = 0) -> Any:
    if priority is None:
        return SimpleNamespace(job=None)
    request = SimpleNamespace(priority=priority)
    return SimpleNamespace(job=SimpleNamespace(request=request, order=order))


def test_outranked_picks_the_newest_lowest_priority_job() -> None:
    chat = pending(0)
    busy = [slot(0, 1), slot(BATCH_PRIORITY, 2), slot(BATCH_PRIORITY, 3)]
    assert outranked(busy, chat, lambda p: True) is busy[2]
    # A free slot and room in the KV cache: nobody needs to step aside.
    free = [slot(BATCH_PRIORITY, 2), slot(None)]
    assert outranked(free, chat, lambda p: True) is None
    assert outranked(free, chat, lambda p: False) is free[0]  # the KV cache is the limit
    assert outranked([slot(0, 1), slot(0, 2)], chat, lambda p: False) is None
    assert outranked(busy, pending(BATCH_PRIORITY), lambda p: False) is None
    assert outranked(busy, None, lambda p: False) is None


def test_results_log_drops_a_torn_last_line(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    store.save_batch("batch_1", b'{"id": "batch_1"}', 1)
    store.append_result("batch_1", {"_i": 0})
    with (tmp_path / "batches" / "batch_1.results").open("ab") as out:
        out.write(b'{"_i": 1, "custom')  # killed mid-write
    assert store.read_results("batch_1") == [{"_i": 0}]
    assert store.get_file("file-../../etc/passwd") is None


def test_progress_line() -> None:
    counts = {"total": 200, "completed": 95, "failed": 5}
    assert Progress.line(counts, 10.0) == \
        "batch [############............] 100/200 (5 failed) 10.0 req/s ETA 10 s"


def test_parse_makes_a_line_error_of_any_wrong_type_or_too_deep_json() -> None:
    data = b"\n".join([line("a"), line("b", url=[ENDPOINT]), line("c", url={"x": 1}),
                       line("d", method=["POST"]), b"[" * 100_000, line("e", body=[1]),
                       # Parses, but nested near Python's limit it could not be encoded
                       # again where it runs: retried for ever, its batch never done.
                       line("f")[:-1] + b', "deep": ' + b"[" * 980 + b"]" * 980 + b"}",
                       line("g", body={"x": json.loads("[" * 63 + "]" * 63)})])
    lines, problems = parse(data, ENDPOINT, 100)
    assert problems == []
    assert [(x.index, x.custom_id, x.body is None, x.error) for x in lines] == [
        (0, "a", False, None),
        (1, "b", True, "url must be a string naming the batch's endpoint "
                       "'/v1/chat/completions'"),
        (2, "c", True, "url must be a string naming the batch's endpoint "
                       "'/v1/chat/completions'"),
        (3, "d", True, 'method must be "POST"'),
        (4, None, True, "the line's JSON is nested too deeply (its body at most 64 levels)"),
        (5, "e", True, "body must be a JSON object"),
        (6, None, True, "the line's JSON is nested too deeply (its body at most 64 levels)"),
        (7, "g", False, None)]


def test_an_expired_file_is_hidden_but_its_bytes_stay_for_the_batch_reading_it(
        tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    record = store.add_file("in.jsonl", "batch", b"data\n", "me", ttl_s=None)
    store.expire_file(record.id, 1000.0)
    assert store.get_file(record.id) is None and store.list_files("me") == []
    assert store.file_bytes(record.id) == b"data\n"  # the running batch still reads it
    assert store.sweep(2000.0, None, keep={record.id}).files == []
    assert store.file_bytes(record.id) == b"data\n"
    assert store.sweep(2000.0, None, keep=set()).files == [record.id]  # the batch ended
    assert not list((tmp_path / "files").iterdir())


def test_errors_name_lines_by_their_number_in_the_file_blank_lines_counted() -> None:
    data = b"\n".join([b"", line("a"), b"  ", b"", line("b"), line("a")]) + b"\n"
    lines, problems = parse(data, ENDPOINT, 10)
    assert [x.index for x in lines] == [0, 1, 2]  # resume's identity: unchanged
    assert [(p.code, p.line) for p in problems] == [("duplicate_custom_id", 6)]
    assert "used by lines 2 and 6" in problems[0].message


def test_a_file_of_one_repeated_custom_id_lists_a_bounded_number_of_problems() -> None:
    _, problems = parse(b"\n".join([line("same")] * 5000), ENDPOINT, 10_000)
    assert len(problems) == 101
    assert [p.line for p in problems[:100]] == list(range(2, 102))
    assert problems[-1].code == "too_many_errors" and problems[-1].line is None
    assert problems[-1].message.startswith("4,899 more problems")


def test_the_sweep_deletes_what_interrupted_writes_left_once_they_are_old(
        tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    kept = store.add_file("in.jsonl", "batch", b"data\n", "me", ttl_s=None)
    store.save_batch("batch_1", b'{"id": "batch_1", "status": "in_progress"}', 1)
    files, batches = tmp_path / "files", tmp_path / "batches"
    (batches / "batch_1.images").mkdir()
    old = [files / "file-aa.data",  # killed between the bytes and the record
           files / f"{kept.id}.json.tmp", batches / "batch_1.json.tmp",
           batches / "batch_1.images" / "file-bb.rgb.tmp"]
    young = [files / "file-cc.data", files / "file-cc.json.tmp"]  # a write under way
    now = time.time()
    for path in old + young:
        path.write_bytes(b"x")
    for path in old:
        os.utime(path, (now - 3601, now - 3601))
    swept = store.sweep(now, None, keep=set())
    assert [p.name for p in old if p.exists()] == [] and all(p.exists() for p in young)
    assert sorted(swept.leftovers) == sorted(str(p.relative_to(tmp_path)) for p in old)
    assert store.file_bytes(kept.id) == b"data\n" and store.get_file(kept.id) == kept
    assert [b["id"] for b in store.load_batches()] == ["batch_1"]


def test_a_files_bytes_open_as_a_stream_that_outlives_a_delete(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    record = store.add_file("out.jsonl", "batch_output", b"a\nb\n", "me")
    with store.open_file(record.id) as stream:
        store.delete_file(record.id)
        assert stream.read(2) == b"a\n" and stream.read() == b"b\n"
    with pytest.raises(FileNotFoundError):
        store.open_file(record.id)
