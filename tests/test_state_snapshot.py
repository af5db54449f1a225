"""A single box's stored responses, conversations and chat completions survive a restart when
`state_snapshot` names a file (server.store.snapshot): written at SIGTERM and every
`state_snapshot_interval_s` while they change (so a SIGKILL loses at most an interval),
private to the server's user, read back at the start (then deleted when there are no
periodic writes); entries keep their age and each owner's use order."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import metric_value

from server.api.chat_store import CHAT_CODEC, stored_chat
from server.api.conversation_store import CONVERSATION_CODEC, new_conversation
from server.api.protocol import ChatMessageIn
from server.demo_model import DemoModelPaths
from server.store import Bounds
from server.store.deletions import DeletionJournal
from server.store.memory import MemoryTable
from server.store.snapshot import claim, discard, load, save
from server.store.snapshot_writer import SnapshotWriter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def table(clock: Clock) -> MemoryTable:
    return MemoryTable(Bounds(10, 1 << 20, 100, 10, 1 << 20, lru=True, evict_others=True),
                       clock)


def test_entries_come_back_with_their_age_and_the_file_goes(tmp_path: Path) -> None:
    clock = Clock()
    before = table(clock)
    old, new = (new_conversation("alice", {"n": str(i)}, []) for i in range(2))
    before.put("alice", old.id, old, old.size)
    clock.now += 60
    before.put("alice", new.id, new, new.size)
    path = tmp_path / "state" / "state.json"
    assert save(path, {"conversations": (before, CONVERSATION_CODEC)}) == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # conversations are private data
    clock.now += 50  # down for a while: `old` (110 s) is past its 100 s TTL by now
    after = table(clock)
    assert load(path, {"conversations": (after, CONVERSATION_CODEC)}) == (1, 1)
    discard(path)  # once started: a crash later cannot bring back what was deleted
    assert not path.exists() and not list(path.parent.glob("*.part"))
    assert after.get("alice", old.id) is None
    assert after.get("alice", new.id) == new and after.get("bob", new.id) is None
    clock.now += 55  # its age went on counting: 105 s since it was written
    assert after.get("alice", new.id) is None
    assert load(path, {"conversations": (table(clock), CONVERSATION_CODEC)}) == (0, 0)


def test_a_record_with_a_body_comes_back_whole(tmp_path: Path) -> None:
    """A stored chat completion keeps its messages in its codec's body: they go along."""
    clock = Clock()
    before = table(clock)
    entry = stored_chat({"id": "chatcmpl-1", "created": 5, "model": "m"}, "alice", {"k": "v"},
                        [ChatMessageIn(role="user", content="Hi.")])
    before.put("alice", entry.id, entry, entry.size)
    path = tmp_path / "state.json"
    assert save(path, {"chat_completions": (before, CHAT_CODEC)}) == 1
    after = table(clock)
    assert load(path, {"chat_completions": (after, CHAT_CODEC)}) == (1, 0)
    back = after.get("alice", entry.id)
    assert back == entry and back is not None and back.messages == entry.messages


def test_an_unreadable_snapshot_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json")
    assert load(path, {"conversations": (table(Clock()), CONVERSATION_CODEC)}) == (0, 0)
    assert not path.exists() and (tmp_path / "state.json.bad").read_text() == "{not json"


def test_a_bad_or_oversized_entry_is_skipped_and_the_others_kept(tmp_path: Path) -> None:
    clock = Clock()
    before = table(clock)
    small, big = (new_conversation("alice", {"pad": "x" * n}, []) for n in (10, 5000))
    before.put("alice", small.id, small, small.size)
    before.put("alice", big.id, big, big.size)
    path = tmp_path / "state.json"
    save(path, {"conversations": (before, CONVERSATION_CODEC)})
    data = json.loads(path.read_text())
    data["tables"]["conversations"].append(["alice", "conv_x", 9, clock.now, "[1, 2]"])
    # A record that decodes but whose size is no number (an edited file): skipped too.
    good_head = data["tables"]["conversations"][0][4]
    data["tables"]["conversations"].append(["alice", "conv_y", "9", clock.now, good_head])
    path.write_text(json.dumps(data))
    # Today's bounds are smaller: the big one would push the others out; it is skipped.
    after = MemoryTable(Bounds(10, 2000, 100, 10, 2000, lru=True, evict_others=True), clock)
    assert load(path, {"conversations": (after, CONVERSATION_CODEC)}) == (1, 3)
    assert after.get("alice", small.id) == small and after.get("alice", big.id) is None


def test_unfinished_background_responses_come_back_failed() -> None:
    from server.api.response_store import stored_response
    from server.api.responses_background import fail_interrupted

    running = stored_response({"id": "resp_a", "background": True, "status": "in_progress",
                               "error": None}, "", [], [])
    done = stored_response({"id": "resp_b", "background": True, "status": "completed",
                            "error": None}, "", [], [])
    failed = fail_interrupted(running)
    assert failed is not None and fail_interrupted(done) is None
    assert failed.status == "failed" and failed.response()["status"] == "failed"
    assert failed.response()["error"]["code"] == "server_shutdown"
    assert done.response()["status"] == "completed"


def test_responses_written_by_the_previous_version_come_back(tmp_path: Path) -> None:
    """Its records held the response object inside their head: read back as their JSON,
    an unfinished background one failed by the start (server.app), the others as they
    were."""
    from test_stored_response_bytes import EARLIER_CODEC, earlier_record

    from server.api.response_store import RESPONSE_CODEC
    from server.app import _fail_interrupted

    clock = Clock()
    before = table(clock)
    running = earlier_record("resp_a", "in_progress", background=True)
    done = earlier_record("resp_b", "completed", background=True)
    for entry in (running, done):
        before.put("", entry.id, entry, entry.size)
    path = tmp_path / "state.json"
    assert save(path, {"responses": (before, EARLIER_CODEC)}) == 2
    rows = json.loads(path.read_text())["tables"]["responses"]
    assert [json.loads(row[4])[2]["status"] for row in rows] == ["in_progress", "completed"]
    after = table(clock)
    assert load(path, {"responses": (after, RESPONSE_CODEC)}) == (2, 0)
    assert _fail_interrupted({"responses": (after, RESPONSE_CODEC)}) == 1
    failed, kept = after.get("", running.id), after.get("", done.id)
    assert failed is not None and kept is not None
    assert failed.status == "failed" and failed.response()["status"] == "failed"
    assert failed.response()["error"]["code"] == "server_shutdown"
    assert failed.conversation == running.conversation
    assert (kept.status, kept.response_json) == ("completed", done.response_json)
    assert kept.input_items == done.input_items


def test_the_setting_names_a_file_not_a_directory(tmp_path: Path) -> None:
    from server.config import ConfigError, load_settings

    for value in (tmp_path, "."):
        with pytest.raises(ConfigError, match="expected a file path"):
            load_settings(None, state_snapshot=value)
    # Empty is off: how the Docker image's and supervisord program's default is unset.
    assert load_settings(None, state_snapshot="").state_snapshot is None
    assert load_settings(None, state_snapshot=" ").state_snapshot is None


@pytest.mark.parametrize("interval", ["0", "300"])
def test_a_restart_keeps_conversations_and_stored_responses(
        demo_model: DemoModelPaths, tmp_path: Path, interval: str) -> None:
    snapshot = tmp_path / "data" / "state.json"
    env = {"VLSERVE_STATE_SNAPSHOT": str(snapshot),
           "VLSERVE_STATE_SNAPSHOT_INTERVAL_S": interval}
    first = start_server(demo_model, tmp_path / "first.log", env=env)
    try:
        client = openai.OpenAI(base_url=first.api, api_key="unused", max_retries=0)
        conversation = client.conversations.create(
            items=[{"role": "user", "content": "Remember tulip."}], metadata={"k": "v"})
        turn = client.responses.create(model="m", conversation=conversation.id,
                                       input="Which word?", max_output_tokens=3)
        items = httpx.get(f"{first.api}/conversations/{conversation.id}/items",
                          timeout=30).json()
        chat = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Keep me."}], max_tokens=2,
            store=True, metadata={"kept": "yes"})
        chat_messages = httpx.get(f"{first.api}/chat/completions/{chat.id}/messages",
                                  timeout=30).json()
    finally:
        stop_server(first)  # SIGTERM: the snapshot is written on the way out
    stopped_at = json.loads(snapshot.read_text())["saved_at"]
    second = start_server(demo_model, tmp_path / "second.log", env=env)
    try:
        client = openai.OpenAI(base_url=second.api, api_key="unused", max_retries=0)
        if interval == "0":  # written only at the stop: deleted once started from
            assert not snapshot.exists()
        else:  # written again at once, with what was restored: a crash now keeps them
            again_at = json.loads(snapshot.read_text())
            assert again_at["saved_at"] > stopped_at
            assert len(again_at["tables"]["conversations"]) == 1
        assert client.conversations.retrieve(conversation.id).metadata == {"k": "v"}
        again = httpx.get(f"{second.api}/conversations/{conversation.id}/items", timeout=30)
        assert again.json() == items
        assert client.responses.retrieve(turn.id).output_text == turn.output_text
        follow = client.responses.create(model="m", previous_response_id=turn.id,
                                         input="Again?", max_output_tokens=1)
        assert follow.usage is not None and turn.usage is not None
        assert follow.usage.input_tokens > turn.usage.input_tokens
        kept = client.chat.completions.retrieve(chat.id)
        assert kept.metadata == {"kept": "yes"}
        assert kept.choices[0].message.content == chat.choices[0].message.content
        assert httpx.get(f"{second.api}/chat/completions/{chat.id}/messages",
                         timeout=30).json() == chat_messages
        assert f"state snapshot {snapshot}: 3 entries restored" in second.log()
        if interval == "0":
            return
        # Deleted after the last periodic write, then a crash: they stay deleted.
        client.conversations.delete(conversation.id)
        client.responses.delete(turn.id)
        client.chat.completions.delete(chat.id)
        second.process.kill()
        second.process.wait()
    finally:
        stop_server(second)
    assert {turn.id} <= responses_in(snapshot)  # the file still holds them ...
    third = start_server(demo_model, tmp_path / "third.log", env=env)
    try:  # ... and the deletes journal took them out again
        client = openai.OpenAI(base_url=third.api, api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            client.conversations.retrieve(conversation.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(turn.id)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.retrieve(chat.id)
        assert "0 entries restored, 0 skipped, 3 deleted again" in third.log()
    finally:
        stop_server(third)


def test_deletes_between_writes_are_journaled_and_trimmed(tmp_path: Path) -> None:
    clock = Clock()
    before = table(clock)
    kept, gone = (new_conversation("alice", {}, []) for _ in range(2))
    for conversation in (kept, gone):
        before.put("alice", conversation.id, conversation, conversation.size)
    path = tmp_path / "state.json"
    writer = SnapshotWriter(path, {"conversations": (before, CONVERSATION_CODEC)}, 300)
    assert writer.write() == 2
    writer.deletions.watch({"conversations": (before, CONVERSATION_CODEC)})
    before.delete("alice", gone.id)  # after the write: the file still holds it
    before.delete("alice", "conv_never_held")  # nothing deleted: nothing noted
    journal = path.with_name("state.json.deleted")
    assert len(journal.read_text().splitlines()) == 1
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600
    after = table(clock)  # a crash, then a start
    tables = {"conversations": (after, CONVERSATION_CODEC)}
    assert load(path, tables) == (2, 0)
    assert DeletionJournal(path).replay(tables) == 1
    assert after.get("alice", gone.id) is None and after.get("alice", kept.id) == kept
    with journal.open("a") as cut:
        cut.write('[1e99,"conversations"')  # a line a crash cut short: skipped
    assert DeletionJournal(path).replay(tables) == 0
    assert writer.write() == 1  # the next write holds the delete: the journal goes
    assert not journal.exists()
    before.delete("alice", kept.id)
    discard(path)  # a start without periodic writes takes both files away
    assert not path.exists() and not journal.exists()


def test_the_journal_is_trimmed_by_position(tmp_path: Path) -> None:
    """A write drops the deletes noted before its tables were read, by their place in the
    file (not their time): one noted meanwhile stays for the next write."""
    journal = DeletionJournal(tmp_path / "state.json")
    journal.note("conversations", "alice", "conv_1")
    read_at = journal.length()  # the write reads the tables now ...
    journal.note("conversations", "alice", "conv_2")  # ... a delete while it writes
    journal.forget(read_at)
    tables = {"conversations": (table(Clock()), CONVERSATION_CODEC)}
    kept = [json.loads(line)[3] for line in journal.path.read_text().splitlines()]
    assert kept == ["conv_2"]
    journal.forget(journal.length())
    assert not journal.path.exists() and journal.replay(tables) == 0


def test_one_file_is_one_servers(tmp_path: Path) -> None:
    """A second process given the same snapshot file cannot claim it (the server then
    keeps none, and says so); the process holding it can, again."""
    path = tmp_path / "state.json"
    assert claim(path) and claim(path)
    other = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                            "from server.store.snapshot import claim; "
                            f"sys.exit(0 if claim(Path({str(path)!r})) else 3)"],
                           cwd=Path(__file__).resolve().parent.parent)
    assert other.returncode == 3


def test_without_the_setting_nothing_is_written(demo_model: DemoModelPaths,
                                                tmp_path: Path) -> None:
    server: RunningServer = start_server(demo_model, tmp_path / "plain.log")
    try:
        assert httpx.post(f"{server.api}/conversations", json={}, timeout=30).status_code == 200
    finally:
        stop_server(server)
    assert "state snapshot" not in server.log()


def test_a_snapshot_that_cannot_be_written_does_not_stop_the_shutdown(
        demo_model: DemoModelPaths, tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the snapshot's directory should be")
    server = start_server(demo_model, tmp_path / "blocked.log",
                          env={"VLSERVE_STATE_SNAPSHOT": str(blocked / "state.json")})
    httpx.post(f"{server.api}/conversations", json={}, timeout=30)
    # The write at the start failed already: operators see it in the metrics.
    metrics = server.url
    assert metric_value(metrics, "vlserve_state_snapshot_writes_total", 'result="failed"') >= 1
    assert metric_value(metrics, "vlserve_state_snapshot_writes_total", 'result="written"') == 0
    assert metric_value(metrics, "vlserve_state_snapshot_last_write_timestamp_seconds") == 0
    stop_server(server)
    assert server.process.returncode == 0, server.log()
    assert "not written" in server.log() and "Application shutdown complete" in server.log()


def responses_in(snapshot: Path) -> set[str]:
    try:
        rows = json.loads(snapshot.read_text())["tables"]["responses"]
    except (OSError, ValueError):  # not written yet
        return set()
    return {row[1] for row in rows}


def test_a_killed_server_comes_back_with_the_last_periodic_write(
        demo_model: DemoModelPaths, tmp_path: Path) -> None:
    """SIGKILL (an OOM kill, a power cut): no shutdown runs; the next start restores what
    the last periodic write held."""
    snapshot = tmp_path / "data" / "state.json"
    env = {"VLSERVE_STATE_SNAPSHOT": str(snapshot), "VLSERVE_STATE_SNAPSHOT_INTERVAL_S": "0.5"}
    first = start_server(demo_model, tmp_path / "first.log", env=env)
    try:
        client = openai.OpenAI(base_url=first.api, api_key="unused", max_retries=0)
        kept = client.responses.create(model="m", input="Remember tulip.", max_output_tokens=3)
        deadline = time.monotonic() + 30
        while kept.id not in responses_in(snapshot):
            assert time.monotonic() < deadline, first.log()
            time.sleep(0.05)
        metrics = first.url
        assert metric_value(metrics, "vlserve_state_snapshot_writes_total",
                            'result="written"') >= 2  # at the start, and with `kept`
        written_at = metric_value(metrics, "vlserve_state_snapshot_last_write_timestamp_seconds")
        assert time.time() - 30 < written_at <= time.time()
    finally:
        first.process.kill()
        first.process.wait()
    assert f"state snapshot {snapshot}: written every 0.5 s" in first.log()
    second = start_server(demo_model, tmp_path / "second.log", env=env)
    try:
        client = openai.OpenAI(base_url=second.api, api_key="unused", max_retries=0)
        again = client.responses.retrieve(kept.id)
        assert again.output_text == kept.output_text and again.status == kept.status
        assert f"state snapshot {snapshot}: 1 entries restored" in second.log()
    finally:
        stop_server(second)


def test_an_unchanged_table_is_not_written_again(tmp_path: Path) -> None:
    clock = Clock()
    conversations = table(clock)
    first, second = (new_conversation("alice", {}, []) for _ in range(2))
    conversations.put("alice", first.id, first, first.size)
    conversations.put("alice", second.id, second, second.size)
    path = tmp_path / "state.json"
    writer = SnapshotWriter(path, {"conversations": (conversations, CONVERSATION_CODEC)}, 1.0)
    assert writer.write() == 2
    inode = path.stat().st_ino
    assert writer.write() is None and path.stat().st_ino == inode  # nothing changed
    conversations.get("alice", second.id)  # the most recent already: its order stays
    conversations.get("bob", first.id)  # not bob's
    assert writer.write() is None and path.stat().st_ino == inode
    conversations.get("alice", first.id)  # the use order moved: worth a write
    assert writer.write() == 2 and path.stat().st_ino != inode
    conversations.delete("alice", first.id)
    assert writer.write() == 1
    assert writer.write(force=True) == 1  # the last one, at a graceful stop


def test_the_periodic_writer_writes_at_once_then_each_interval(tmp_path: Path) -> None:
    clock = Clock()
    conversations = table(clock)
    path = tmp_path / "state.json"
    tables = {"conversations": (conversations, CONVERSATION_CODEC)}

    def held() -> int | None:
        try:
            return len(json.loads(path.read_text())["tables"]["conversations"])
        except OSError:
            return None

    async def until(count: int) -> None:
        deadline = time.monotonic() + 10
        while held() != count:
            assert time.monotonic() < deadline, held()
            await asyncio.sleep(0.01)

    async def run() -> None:
        writer = SnapshotWriter(path, tables, 0.05)
        writer.start()
        await until(0)  # written at once, empty
        added = new_conversation("alice", {}, [])
        conversations.put("alice", added.id, added, added.size)
        await until(1)  # the next interval's write
        conversations.delete("alice", added.id)
        await writer.close()  # the last write, whatever the interval
        assert json.loads(path.read_text())["tables"]["conversations"] == []

    asyncio.run(run())


def test_each_owners_use_order_survives_a_restart(tmp_path: Path) -> None:
    """Restored by storing order (the TTL walk needs it), then put back in use order: an
    owner at its share loses its least recently used entry, as before the restart."""
    clock = Clock()

    def lru_table() -> MemoryTable:
        return MemoryTable(Bounds(10, 1 << 20, 100, 2, 1 << 20, lru=True, evict_others=True),
                           clock)

    before = lru_table()
    old, new, third = (new_conversation("alice", {"n": str(i)}, []) for i in range(3))
    for conversation in (old, new):
        before.put("alice", conversation.id, conversation, conversation.size)
        clock.now += 1
    before.get("alice", old.id)  # used last: `new` is the least recently used now
    path = tmp_path / "state.json"
    save(path, {"conversations": (before, CONVERSATION_CODEC)})
    after = lru_table()
    assert load(path, {"conversations": (after, CONVERSATION_CODEC)}) == (2, 0)
    assert [c.id for c in after.values("alice")] == [new.id, old.id]
    after.put("alice", third.id, third, third.size)  # over alice's share of 2
    assert after.get("alice", new.id) is None and after.get("alice", old.id) == old
    # The storing order is kept too: expiry still goes oldest first.
    assert [e.key for e in after.entries()] == [old.id, third.id]


def conversations_in(snapshot: Path) -> set[str]:
    try:
        rows = json.loads(snapshot.read_text())["tables"]["conversations"]
    except (OSError, ValueError):  # not written yet
        return set()
    return {row[1] for row in rows}


def test_a_server_that_waited_for_the_file_takes_over_the_last_write(
        demo_model: DemoModelPaths, tmp_path: Path) -> None:
    """A deploy that overlaps (the new server starts while the old one drains on the same
    file): the new one waits for the file, then reads the old one's last write into what
    it stored meanwhile and keeps both from then on."""
    snapshot = tmp_path / "data" / "state.json"
    env = {"VLSERVE_STATE_SNAPSHOT": str(snapshot), "VLSERVE_STATE_SNAPSHOT_INTERVAL_S": "300"}
    old = start_server(demo_model, tmp_path / "old.log",
                       env={**env, "VLSERVE_STATE_SNAPSHOT_INTERVAL_S": "0.2"})
    new: RunningServer | None = None
    try:
        client = openai.OpenAI(base_url=old.api, api_key="unused", max_retries=0)
        early = client.conversations.create(metadata={"on": "old"}).id
        deadline = time.monotonic() + 30
        while conversations_in(snapshot) != {early}:  # a periodic write holds it
            assert time.monotonic() < deadline, old.log()
            time.sleep(0.05)
        new = start_server(demo_model, tmp_path / "new.log", env=env)
        assert metric_value(new.url, "vlserve_state_snapshot_held") == 0
        assert metric_value(old.url, "vlserve_state_snapshot_held") == 1
        late = client.conversations.create(metadata={"on": "old"}).id
        client = openai.OpenAI(base_url=new.api, api_key="unused", max_retries=0)
        mine = client.conversations.create(metadata={"on": "new"}).id
        gone = client.conversations.create().id
        client.conversations.delete(gone)  # meanwhile: must not come back
        time.sleep(0.5)  # the old one writes on; the new one writes nothing yet
        assert conversations_in(snapshot) == {early, late}
    finally:
        stop_server(old)  # SIGTERM: its last write, then the file is free
    assert new is not None
    try:
        assert conversations_in(snapshot) == {early, late}
        deadline = time.monotonic() + 30
        while metric_value(new.url, "vlserve_state_snapshot_held") != 1:
            assert time.monotonic() < deadline, new.log()
            time.sleep(0.1)
        assert client.conversations.retrieve(late).metadata == {"on": "old"}
        assert client.conversations.retrieve(early).metadata == {"on": "old"}
        assert client.conversations.retrieve(mine).metadata == {"on": "new"}
        with pytest.raises(openai.NotFoundError):
            client.conversations.retrieve(gone)
        log = new.log()
        assert f"state snapshot {snapshot} is held by another server" in log
        assert f"state snapshot {snapshot}: 2 entries restored, 0 skipped" in log
        assert log.count("held by another server") == 1 and log.count("claimed (") == 1
        deadline = time.monotonic() + 30  # written at once, with both servers' entries
        while conversations_in(snapshot) != {early, late, mine}:
            assert time.monotonic() < deadline, new.log()
            time.sleep(0.05)
        after = client.conversations.create().id
    finally:
        stop_server(new)
    assert conversations_in(snapshot) == {early, late, mine, after}


def test_a_writer_waits_for_a_file_another_process_holds(tmp_path: Path) -> None:
    """Store level: a writer that cannot claim the file leaves it and its deletes journal
    alone; once the holder is gone it reads the last write (the holder's deletes after it
    applied) behind its own entries and writes them all."""
    clock = Clock()
    path = tmp_path / "state.json"
    theirs = table(clock)
    early, late, deleted = (new_conversation("alice", {"n": str(i)}, []) for i in range(3))
    for conversation in (early, deleted):
        theirs.put("alice", conversation.id, conversation, conversation.size)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from server.store.snapshot import claim; "
         f"assert claim(Path({str(path)!r})); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        clock.now += 1
        ours = table(clock)
        tables = {"conversations": (ours, CONVERSATION_CODEC)}
        mine, dropped = (new_conversation("alice", {}, []) for _ in range(2))
        ours.put("alice", mine.id, mine, mine.size)

        async def run() -> None:
            writer = SnapshotWriter(path, tables, 0.05)
            await writer.open()
            assert not writer.held
            writer.start()
            ours.put("alice", dropped.id, dropped, dropped.size)
            ours.delete("alice", dropped.id)  # meanwhile: not in its journal, not back
            # The holder's last write, then a delete it noted after it (then it stops).
            theirs.put("alice", late.id, late, late.size)
            save(path, {"conversations": (theirs, CONVERSATION_CODEC)})
            DeletionJournal(path).note("conversations", "alice", deleted.id)
            await asyncio.sleep(0.3)
            assert not writer.held and conversations_in(path) == {early.id, late.id, deleted.id}
            assert len(path.with_name("state.json.deleted").read_text().splitlines()) == 1
            assert holder.stdin is not None
            holder.stdin.close()
            deadline = time.monotonic() + 10
            while conversations_in(path) != {early.id, late.id, mine.id}:
                assert time.monotonic() < deadline, conversations_in(path)
                await asyncio.sleep(0.05)
            assert writer.held
            await writer.close()

        asyncio.run(run())
    finally:
        holder.kill()
        holder.wait()
    assert ours.get("alice", deleted.id) is None and ours.get("alice", dropped.id) is None
    # Ours are the most recently used; expiry still walks oldest first.
    assert [c.id for c in ours.values("alice")] == [early.id, late.id, mine.id]
    assert [e.key for e in ours.entries()] == [early.id, late.id, mine.id]
    assert not path.with_name("state.json.deleted").exists()  # the write held the delete


def test_entries_read_in_behind_ours_never_push_ours_out() -> None:
    """Merging a snapshot into a table in use: what does not fit beside our entries is
    left out, theirs oldest first, never ours."""
    clock = Clock()

    def small() -> MemoryTable:
        return MemoryTable(Bounds(10, 1 << 20, 100, 2, 1 << 20, lru=True, evict_others=True),
                           clock)

    theirs, ours = small(), small()
    old, newer = (new_conversation("alice", {"n": str(i)}, []) for i in range(2))
    for conversation in (old, newer):
        theirs.put("alice", conversation.id, conversation, conversation.size)
        clock.now += 1
    mine = new_conversation("alice", {}, [])
    ours.put("alice", mine.id, mine, mine.size)
    assert ours.absorb(theirs) == 1
    assert [c.id for c in ours.values("alice")] == [newer.id, mine.id]
    assert ours.absorb(theirs) == 0  # all held or no room: nothing changes
    clock.now += 99.5  # `newer` (stored 1 s before `mine`) expires first
    assert [c.id for c in ours.values("alice")] == [mine.id]


def test_entries_read_in_keep_each_owners_storing_order_when_not_lru() -> None:
    """Where each owner loses its oldest entry first (not LRU: stored responses), theirs
    go among ours by age, not behind: a newer entry of the old server's last write is not
    evicted before our older one."""
    clock = Clock()

    def oldest_out() -> MemoryTable:
        return MemoryTable(Bounds(10, 1 << 20, 100, 2, 1 << 20, lru=False,
                                  evict_others=True), clock)

    theirs, ours = oldest_out(), oldest_out()
    mine, their_last, next_one = (new_conversation("alice", {"n": str(i)}, [])
                                  for i in range(3))
    ours.put("alice", mine.id, mine, mine.size)  # stored while waiting for the file
    clock.now += 5
    theirs.put("alice", their_last.id, their_last, their_last.size)  # its last write
    clock.now += 1
    assert ours.absorb(theirs) == 1
    assert [c.id for c in ours.values("alice")] == [mine.id, their_last.id]
    clock.now += 1
    ours.put("alice", next_one.id, next_one, next_one.size)  # at its share: the oldest goes
    assert [c.id for c in ours.values("alice")] == [their_last.id, next_one.id]


def test_a_snapshot_is_read_in_pieces(tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Read a chunk at a time (here a few characters, so chunk ends fall inside strings,
    numbers and records), in any JSON layout; a file cut short is set aside with what
    came before the cut kept."""
    from server.store import snapshot_reader

    clock = Clock()
    before = table(clock)
    conversations = [new_conversation("alice", {"n": str(i)}, []) for i in range(3)]
    for conversation in conversations:
        before.put("alice", conversation.id, conversation, conversation.size)
        clock.now += 0.125
    path = tmp_path / "state.json"
    save(path, {"conversations": (before, CONVERSATION_CODEC)})
    monkeypatch.setattr(snapshot_reader, "_CHUNK", 3)
    after = table(clock)
    assert load(path, {"conversations": (after, CONVERSATION_CODEC)}) == (3, 0)
    assert [e.stored_at for e in after.entries()] == [e.stored_at for e in before.entries()]
    data = json.loads(path.read_text())
    # Indented, with a field unknown today and the use order after the records: read.
    path.write_text(json.dumps({"version": 1, "tables": data["tables"],
                                "extra": [1, {"x": 2.5}], "order": data["order"]}, indent=2))
    after = table(clock)
    assert load(path, {"conversations": (after, CONVERSATION_CODEC)}) == (3, 0)
    # The version after the records: unknown when they come, so not read.
    path.write_text(json.dumps({"tables": data["tables"], "version": 1}))
    assert load(path, {"conversations": (table(clock), CONVERSATION_CODEC)}) == (0, 0)
    assert (tmp_path / "state.json.bad").exists()
    text = json.dumps(data)
    path.write_text(text[:text.rindex("[")])  # the last record cut off
    after = table(clock)
    assert load(path, {"conversations": (after, CONVERSATION_CODEC)}) == (2, 0)
    assert not path.exists() and (tmp_path / "state.json.bad").exists()
