"""A single box's stored responses and conversations survive a graceful restart when
`state_snapshot` names a file (server.store.snapshot): written at SIGTERM, private to the
server's user, read back at the start and then deleted; entries keep their age."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import httpx
import openai
import pytest
from conftest import RunningServer, start_server, stop_server

from server.api.conversation_store import CONVERSATION_CODEC, new_conversation
from server.demo_model import DemoModelPaths
from server.store import Bounds
from server.store.memory import MemoryTable
from server.store.snapshot import discard, load, save


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
    path.write_text(json.dumps(data))
    # Today's bounds are smaller: the big one would push the others out; it is skipped.
    after = MemoryTable(Bounds(10, 2000, 100, 10, 2000, lru=True, evict_others=True), clock)
    assert load(path, {"conversations": (after, CONVERSATION_CODEC)}) == (1, 2)
    assert after.get("alice", small.id) == small and after.get("alice", big.id) is None


def test_unfinished_background_responses_come_back_failed() -> None:
    from server.api.response_store import stored_response
    from server.api.responses_background import fail_interrupted

    running = stored_response({"id": "resp_a", "background": True, "status": "in_progress",
                               "error": None}, "", [], [])
    done = stored_response({"id": "resp_b", "background": True, "status": "completed",
                            "error": None}, "", [], [])
    assert fail_interrupted([running, done]) == 1
    assert running.response["status"] == "failed"
    assert running.response["error"]["code"] == "server_shutdown"
    assert done.response["status"] == "completed"


def test_the_setting_names_a_file_not_a_directory(tmp_path: Path) -> None:
    from server.config import ConfigError, load_settings

    for value in (tmp_path, ""):
        with pytest.raises(ConfigError, match="expected a file path"):
            load_settings(None, state_snapshot=value)


def test_a_restart_keeps_conversations_and_stored_responses(
        demo_model: DemoModelPaths, tmp_path: Path) -> None:
    snapshot = tmp_path / "data" / "state.json"
    env = {"VLSERVE_STATE_SNAPSHOT": str(snapshot)}
    first = start_server(demo_model, tmp_path / "first.log", env=env)
    try:
        client = openai.OpenAI(base_url=first.api, api_key="unused", max_retries=0)
        conversation = client.conversations.create(
            items=[{"role": "user", "content": "Remember tulip."}], metadata={"k": "v"})
        turn = client.responses.create(model="m", conversation=conversation.id,
                                       input="Which word?", max_output_tokens=3)
        items = httpx.get(f"{first.api}/conversations/{conversation.id}/items",
                          timeout=30).json()
    finally:
        stop_server(first)  # SIGTERM: the snapshot is written on the way out
    assert json.loads(snapshot.read_text())["version"] == 1
    second = start_server(demo_model, tmp_path / "second.log", env=env)
    try:
        client = openai.OpenAI(base_url=second.api, api_key="unused", max_retries=0)
        assert not snapshot.exists()
        assert client.conversations.retrieve(conversation.id).metadata == {"k": "v"}
        again = httpx.get(f"{second.api}/conversations/{conversation.id}/items", timeout=30)
        assert again.json() == items
        assert client.responses.retrieve(turn.id).output_text == turn.output_text
        follow = client.responses.create(model="m", previous_response_id=turn.id,
                                         input="Again?", max_output_tokens=1)
        assert follow.usage is not None and turn.usage is not None
        assert follow.usage.input_tokens > turn.usage.input_tokens
        assert f"state snapshot {snapshot}: 2 entries restored" in second.log()
    finally:
        stop_server(second)


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
    stop_server(server)
    assert server.process.returncode == 0, server.log()
    assert "not written" in server.log() and "Application shutdown complete" in server.log()
