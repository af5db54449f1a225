"""API keys rotated without a restart (server.api.keyring): a server started with
`api_key_file` accepts the file's new keys and refuses its removed ones once the file
changes (polled) or at once on SIGHUP; a bad file keeps the keys in force; keys from the
settings stay, even when the file named them too; SIGHUP never ends the process."""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import photo_bytes

from server.demo_model import DemoModelPaths

OLD, NEW, NEWER, FIXED = "sk-old-0000", "sk-new-1111", "sk-newer-22", "sk-fixed-from-env"
POLL_S = 0.2  # the key file's poll, short here so the tests wait on it with a wide margin


@pytest.fixture(scope="module")
def keyed(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[RunningServer, Path]]:
    tmp = tmp_path_factory.mktemp("rotation")
    key_file = tmp / "keys"
    key_file.write_text(f"# operators\n{OLD}\n{FIXED}\n")  # FIXED is in the env too
    server = start_server(demo_model, tmp / "server.log",
                          env={"VLSERVE_API_KEY_FILE": str(key_file), "VLSERVE_API_KEY": FIXED,
                               "VLSERVE_API_KEY_FILE_POLL_S": str(POLL_S)})
    yield server, key_file
    stop_server(server)


def status(server: RunningServer, key: str) -> int:
    return httpx.get(f"{server.api}/models", timeout=10,
                     headers={"Authorization": f"Bearer {key}"}).status_code


def until_accepted(server: RunningServer, accepted: set[str], refused: set[str]) -> None:
    deadline = time.monotonic() + 15
    while True:
        seen = {key: status(server, key) for key in accepted | refused}
        if all(seen[k] == 200 for k in accepted) and all(seen[k] == 401 for k in refused):
            return
        assert time.monotonic() < deadline, seen
        time.sleep(0.1)


def replace_file(path: Path, text: str) -> None:
    """As an operator's tooling (or a Kubernetes secret volume) does: a new file renamed
    over the old one."""
    part = path.with_name(path.name + ".new")
    part.write_text(text)
    os.replace(part, path)


def test_a_changed_key_file_rotates_the_keys(keyed: tuple[RunningServer, Path]) -> None:
    server, key_file = keyed
    replace_file(key_file, f"{OLD}\n{FIXED}\n")
    until_accepted(server, {OLD, FIXED}, {NEW})
    replace_file(key_file, f"{NEW}\n")  # FIXED gone from the file: the env still names it
    until_accepted(server, {NEW, FIXED}, {OLD})
    assert "api_key_file reloaded (the file changed): 1 key(s) added, 1 removed, 2 in force" \
        in server.log()

    # A file with no key (or unreadable) would lock everyone out: the keys in force stay.
    replace_file(key_file, "# emptied by mistake\n")
    deadline = time.monotonic() + 15
    while "contains no keys; the 2 key(s) in force stay" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    assert (status(server, NEW), status(server, FIXED)) == (200, 200)
    key_file.unlink()
    time.sleep(10 * POLL_S)  # polls find no file: nothing changes either
    assert (status(server, NEW), status(server, FIXED)) == (200, 200)


def test_sighup_reloads_at_once(keyed: tuple[RunningServer, Path]) -> None:
    server, key_file = keyed
    replace_file(key_file, f"{NEW}\n")
    until_accepted(server, {NEW}, {NEWER})
    time.sleep(10 * POLL_S)  # the polls have taken in the file as it is now
    # Rewritten in place with the same size and times: only the signal can tell.
    before = key_file.stat()
    with key_file.open("r+") as keys:
        keys.write(f"{NEWER}\n")
    os.utime(key_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert key_file.stat().st_size == before.st_size
    time.sleep(10 * POLL_S)  # polls saw nothing
    assert (status(server, NEWER), status(server, NEW)) == (401, 200)
    server.process.send_signal(signal.SIGHUP)
    until_accepted(server, {NEWER, FIXED}, {NEW})
    assert "api_key_file reloaded (SIGHUP)" in server.log()
    assert server.process.poll() is None  # SIGHUP's default would have ended it


def test_sighup_without_a_key_file_does_not_end_the_server(server: RunningServer) -> None:
    server.process.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert server.process.poll() is None
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def upload(server: RunningServer, key: str, seed: int) -> str:
    answer = httpx.post(f"{server.api}/files", data={"purpose": "vision"}, timeout=30,
                        files={"file": ("x.png", io.BytesIO(photo_bytes(20, 20, seed=seed)))},
                        headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def kept(server: RunningServer, key: str, file_id: str) -> bool:
    return httpx.get(f"{server.api}/files/{file_id}", timeout=10,
                     headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_new_keys_split_the_stores_again(demo_model: DemoModelPaths, tmp_path: Path) -> None:
    """One key's share was the whole store (4 uploads); once a second key is added, each
    key's share is half of it, so the first key can no longer fill the store and leave the
    new key nothing (with the shares of the start, 4 and 4 added up to 8 in a store of 4)."""
    key_file = tmp_path / "keys"
    key_file.write_text(f"{OLD}\n")
    server = start_server(demo_model, tmp_path / "server.log",
                          env={"VLSERVE_API_KEY_FILE": str(key_file),
                               "VLSERVE_UPLOAD_MAX_FILES": "4",
                               "VLSERVE_BATCH_MAX_FILES": "4"})
    try:
        replace_file(key_file, f"{OLD}\n{NEW}\n")
        server.process.send_signal(signal.SIGHUP)
        until_accepted(server, {OLD, NEW}, set())
        old = [upload(server, OLD, seed) for seed in range(4)]
        assert [kept(server, OLD, file_id) for file_id in old] == [False, False, True, True]
        new = [upload(server, NEW, seed) for seed in range(2)]  # room for the new key's share
        assert all(kept(server, NEW, file_id) for file_id in new)
        assert all(kept(server, OLD, file_id) for file_id in old[2:])
        assert "store shares split among 2 key(s)" in server.log()
        # Batch files too: the old key's share is 2 of the 4, not all 4.
        batch_file = (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", '
                      b'"body": {"messages": []}}\n')
        answers = [httpx.post(f"{server.api}/files", timeout=10,
                              headers={"Authorization": f"Bearer {OLD}"},
                              data={"purpose": "batch"},
                              files={"file": ("in.jsonl", batch_file)}) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 413], answers[-1].text
        assert answers[-1].json()["error"]["code"] == "batch_quota_exceeded"
    finally:
        stop_server(server)
