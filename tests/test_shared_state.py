"""Two `vlserve serve` replicas sharing one Redis (state_url): a file uploaded on one and
a response stored on one are usable from the other; per-key quotas and the TTL hold in
Redis; a Redis that goes away is a 503 in OpenAI's error shape, never a hang or a crash.
The nginx front (server/cluster/front.py): uploads and chats through one address."""

from __future__ import annotations

import io
import json
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import data_url, image_message, photo_bytes, skip_unless_ci
from redis_server import RedisServer, start_redis
from test_request_log import request_lines

from bench.servers import free_port, stop_process
from server.cluster.front import launch_nginx, nginx_binary, write_nginx_conf
from server.demo_model import DemoModelPaths

KEY_1, KEY_2 = "sk-shared-one", "sk-shared-two"
RESPONSE_TTL_S = 3.0
LONG = 8000  # tokens: seconds of generation on the tiny model, ended by a stop


@pytest.fixture(scope="module")
def replicas(demo_model: DemoModelPaths, redis: RedisServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningServer]]:
    logs = tmp_path_factory.mktemp("replicas")
    env = {"VLSERVE_STATE_URL": redis.url(0), "VLSERVE_MAX_TOKENS_CAP": str(LONG)}
    started: list[RunningServer] = []
    try:
        for name in ("a", "b"):
            started.append(start_server(demo_model, logs / f"{name}.log", "--n-ctx",
                                        str(LONG + 200),
                                        env={**env, "VLSERVE_REPLICA_ID": name}))
        yield started
    finally:
        for server in started:
            stop_server(server)


def sdk(server: RunningServer | str, key: str = "unused") -> openai.OpenAI:
    base = server if isinstance(server, str) else server.api
    return openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)


def file_chat(file_id: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                         {"type": "file", "file": {"file_id": file_id}}]}]


# ---------- two replicas, one Redis ----------

def test_an_upload_on_one_replica_is_used_in_a_chat_on_the_other(
        replicas: list[RunningServer]) -> None:
    a, b = (sdk(r) for r in replicas)
    png = photo_bytes(200, 150, seed=161)
    uploaded = a.files.create(file=("cat.png", io.BytesIO(png)), purpose="vision")
    # B never saw the upload: it reads the pixels from Redis and encodes them itself (its
    # own embedding cache missed), answering as A does for the same image sent inline.
    assert b.files.retrieve(uploaded.id).filename == "cat.png"
    assert uploaded.id in {f.id for f in b.files.list()}
    on_b = b.chat.completions.create(model="m", temperature=0, max_tokens=6,
                                     messages=file_chat(uploaded.id))
    timings = on_b.model_extra["timings"]
    assert timings["image_tokens"] > 0 and timings["image_encode"] > 0
    inline = a.chat.completions.create(model="m", temperature=0, max_tokens=6,
                                       messages=[image_message("What is it?", data_url(png))])
    assert on_b.choices[0].message.content == inline.choices[0].message.content
    assert b.files.delete(uploaded.id).deleted is True  # deleted on B: gone on A too
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(uploaded.id)
    with pytest.raises(openai.BadRequestError) as refused:
        a.chat.completions.create(model="m", max_tokens=2, messages=file_chat(uploaded.id))
    assert refused.value.body["code"] == "file_not_found"  # type: ignore[index]


def test_a_response_stored_on_one_replica_is_continued_read_and_deleted_on_the_other(
        replicas: list[RunningServer]) -> None:
    a, b = (sdk(r) for r in replicas)
    made = a.responses.create(model="m", input="Remember the word tulip.",
                              max_output_tokens=4, temperature=0)
    assert b.responses.retrieve(made.id).output_text == made.output_text
    assert [i.id for i in b.responses.input_items.list(made.id)] == \
        [i.id for i in a.responses.input_items.list(made.id)]
    follow = b.responses.create(model="m", input="Which word?", max_output_tokens=4,
                                previous_response_id=made.id)
    assert follow.usage is not None and made.usage is not None
    # The conversation came from Redis: turn 2's prompt holds turn 1, which B evaluates
    # itself (its KV never held it; at most the template's opening is reused).
    assert follow.usage.input_tokens > made.usage.input_tokens
    assert follow.usage.input_tokens_details.cached_tokens < made.usage.input_tokens
    assert a.responses.retrieve(follow.id).previous_response_id == made.id
    deleted = httpx.delete(f"{replicas[1].api}/responses/{made.id}", timeout=30)
    assert deleted.json() == {"id": made.id, "object": "response", "deleted": True}
    for attempt in (lambda: a.responses.retrieve(made.id),
                    lambda: a.responses.create(model="m", input="Again?", max_output_tokens=1,
                                               previous_response_id=made.id)):
        with pytest.raises(openai.NotFoundError) as refused:
            attempt()
        assert refused.value.body["code"] == "response_not_found"  # type: ignore[index]


def test_a_conversation_made_on_one_replica_is_continued_on_the_other(
        replicas: list[RunningServer]) -> None:
    a, b = (sdk(r) for r in replicas)
    made = a.conversations.create(items=[{"role": "user", "content": "Remember tulip."}],
                                  metadata={"from": "a"})
    first = b.responses.create(model="m", conversation=made.id, input="Which word?",
                               max_output_tokens=3)
    second = a.responses.create(model="m", conversation=made.id, input="Again?",
                                max_output_tokens=3)
    assert first.usage is not None and second.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens  # A read B's turn from Redis
    listed = b.conversations.items.list(made.id, order="asc")
    assert [i.role for i in listed.data] == ["user", "user", "assistant", "user",  # type: ignore[union-attr]
                                             "assistant"]
    assert listed.data[-1].id == second.output[0].id
    assert b.conversations.retrieve(made.id).metadata == {"from": "a"}
    b.conversations.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        a.conversations.retrieve(made.id)


def test_a_background_response_run_on_one_replica_is_read_on_the_other(
        replicas: list[RunningServer]) -> None:
    a, b = (sdk(r) for r in replicas)
    queued = a.responses.create(model="m", input="Hello.", max_output_tokens=4,
                                temperature=0, background=True)
    assert queued.status == "queued"
    deadline = time.monotonic() + 60
    while (seen := b.responses.retrieve(queued.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, seen.status
        time.sleep(0.05)
    assert seen.status == "incomplete" and seen.usage is not None
    assert seen.usage.output_tokens == 4
    # Its events are A's to replay, not B's; B says where to read it instead.
    with pytest.raises(openai.BadRequestError) as elsewhere:
        b.responses.retrieve(queued.id, stream=True)
    assert "only by the replica that runs it" in elsewhere.value.body["message"]  # type: ignore[index]


def test_two_replicas_changing_one_conversation_at_once_lose_nothing(
        replicas: list[RunningServer]) -> None:
    made = sdk(replicas[0]).conversations.create()
    per_client, clients = 8, [sdk(r) for r in replicas for _ in range(3)]
    failures: list[BaseException] = []

    def add_items(client: openai.OpenAI, who: int) -> None:
        try:
            for n in range(per_client):
                client.conversations.items.create(made.id, items=[
                    {"role": "user", "content": f"note {who}-{n}"}])
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=add_items, args=(client, who))
               for who, client in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    listed = sdk(replicas[1]).conversations.items.list(made.id, limit=100, order="asc")
    notes = {item.content[0].text for item in listed.data}  # type: ignore[union-attr]
    # Each change is a read, a change and a write of the whole record: without one lock
    # among the replicas, changes made at once overwrite each other.
    assert notes == {f"note {who}-{n}" for who in range(len(clients))
                     for n in range(per_client)}


def test_a_response_running_on_a_conversation_locks_it_on_the_other_replica(
        replicas: list[RunningServer]) -> None:
    a_server, b_server = replicas
    b = sdk(b_server)
    made = b.conversations.create()
    started, go_on = threading.Event(), threading.Event()
    seen: list[dict] = []

    def stream_on_a() -> None:  # reads one event, then waits: A's response runs meanwhile
        with httpx.stream("POST", f"{a_server.api}/responses", timeout=120, json={
                "model": "m", "conversation": made.id, "input": "Go on.", "stream": True,
                "max_output_tokens": LONG, "temperature": 0}) as answer:
            for line in answer.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    started.set()
                    go_on.wait(60)

    reader = threading.Thread(target=stream_on_a)
    reader.start()
    try:
        assert started.wait(60)
        # Without one lock among the replicas B would answer at once, without A's turn.
        with pytest.raises(openai.BadRequestError) as locked:
            b.responses.create(model="m", conversation=made.id, input="Me too.",
                               max_output_tokens=1)
        assert locked.value.body["code"] == "conversation_locked"  # type: ignore[index]
        assert locked.value.body["param"] == "conversation"  # type: ignore[index]
    finally:
        go_on.set()
        reader.join(120)
    assert seen[-1]["type"] == "response.incomplete", seen[-1]["type"]  # ran to its cap
    # A gave the conversation back before its stream ended: B goes on after A's turn
    # (its prompt without it: A's LONG answer fills the context; the conversation keeps it).
    after = b.responses.create(model="m", conversation=made.id, input="Me too.",
                               max_output_tokens=1, truncation="auto")
    listed = b.conversations.items.list(made.id, order="asc", limit=10)
    assert [(i.role, i.id) for i in listed.data] == [  # type: ignore[union-attr]
        ("user", listed.data[0].id), ("assistant", seen[-1]["response"]["output"][0]["id"]),
        ("user", listed.data[2].id), ("assistant", after.output[0].id)]
    assert listed.data[0].content[0].text == "Go on."  # type: ignore[union-attr]
    assert listed.data[2].content[0].text == "Me too."  # type: ignore[union-attr]


@pytest.mark.parametrize("stop", ["cancel", "delete"])
def test_a_background_response_stopped_on_the_other_replica_stops_generating(
        replicas: list[RunningServer], stop: str) -> None:
    a, b = (sdk(r) for r in replicas)
    running = a.responses.create(model="m", input="Go on.", max_output_tokens=LONG,
                                 temperature=0, background=True)
    deadline = time.monotonic() + 60
    while a.responses.retrieve(running.id).status == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    if stop == "cancel":
        assert b.responses.cancel(running.id).status == "cancelled"
    else:
        b.responses.delete(running.id)
    # A finds the mark B left within a poll and stops, long before LONG tokens.
    deadline = time.monotonic() + 30
    while not (ended := [line for line in request_lines(replicas[0], running.id)
                         if line["event"] == "background_response"]):
        assert time.monotonic() < deadline, "the run on A never ended"
        time.sleep(0.05)
    [ended] = ended
    assert ended["status"] == 499, ended  # counted as stopped, as a local cancel is
    assert 0 < ended["timings"]["completion_tokens"] < LONG, ended
    if stop == "cancel":  # what B marked stands: A wrote nothing over it
        assert b.responses.retrieve(running.id).status == "cancelled"
    else:  # and a deleted one is not written back by the run's end
        with pytest.raises(openai.NotFoundError):
            a.responses.retrieve(running.id)


# ---------- bounds in Redis, and Redis going away ----------

@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of this replica's own, which the last tests stop and restart."""
    server = start_redis(tmp_path_factory.mktemp("redis-guarded"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyed(demo_model: DemoModelPaths, own_redis: RedisServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Two API keys sharing a 4-file store (2 each); responses live 3 s; Redis calls wait
    at most 2 s."""
    running = start_server(demo_model, tmp_path_factory.mktemp("keyed") / "server.log",
                           env={"VLSERVE_STATE_URL": own_redis.url(3),
                                "VLSERVE_API_KEYS": f"{KEY_1},{KEY_2}",
                                "VLSERVE_UPLOAD_MAX_FILES": "4",
                                "VLSERVE_RESPONSES_TTL_S": str(RESPONSE_TTL_S),
                                "VLSERVE_STATE_TIMEOUT_S": "2"})
    yield running
    stop_server(running)


def upload(client: openai.OpenAI, seed: int) -> str:
    return client.files.create(file=("x.png", io.BytesIO(photo_bytes(24, 24, seed=seed))),
                               purpose="vision").id


def exists(client: openai.OpenAI, file_id: str) -> bool:
    try:
        client.files.retrieve(file_id)
    except openai.NotFoundError:
        return False
    return True


def test_per_key_quotas_are_enforced_in_redis(keyed: RunningServer, own_redis: RedisServer
                                              ) -> None:
    one, two = sdk(keyed, KEY_1), sdk(keyed, KEY_2)
    theirs = [upload(two, seed) for seed in (1, 2)]
    mine = [upload(one, seed) for seed in (3, 4, 5)]  # a third: key 1's own oldest goes
    assert [exists(one, f) for f in mine] == [False, True, True]
    assert all(exists(two, f) for f in theirs) and not exists(one, theirs[0])
    assert redis_cli(own_redis, "ZCARD", "vlserve:files:born") == "4"  # Redis holds 4, not 5


def redis_cli(redis: RedisServer, *words: str) -> str:
    """A command on the keyed replica's database (3), as redis-cli prints its answer."""
    done = subprocess.run(["redis-cli", "-p", str(redis.port), "-n", "3", *words],
                          capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


def test_stored_responses_expire_in_redis(keyed: RunningServer, own_redis: RedisServer
                                          ) -> None:
    client = sdk(keyed, KEY_1)
    made = client.responses.create(model="m", input="Soon gone.", max_output_tokens=2)
    stored = time.monotonic()
    assert redis_cli(own_redis, "HEXISTS", "vlserve:responses:owner", made.id) == "1"
    while True:
        try:
            client.responses.retrieve(made.id)
        except openai.NotFoundError as gone:
            assert gone.body["code"] == "response_not_found"  # type: ignore[index]
            break
        assert time.monotonic() - stored < RESPONSE_TTL_S + 30, "never expired"
        time.sleep(0.2)
    assert time.monotonic() - stored >= RESPONSE_TTL_S - 1
    assert redis_cli(own_redis, "HEXISTS", "vlserve:responses:owner", made.id) == "0"


def assert_503(answer: httpx.Response) -> None:
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "state_store_unavailable"
    assert "shared state store" in error["message"] and "redis" not in error["message"].lower()
    assert answer.headers["Retry-After"] == "2"


def test_a_redis_that_goes_away_is_a_503_then_recovers(keyed: RunningServer,
                                                       own_redis: RedisServer) -> None:
    client = sdk(keyed, KEY_1)
    file_id = upload(client, seed=9)
    made = client.responses.create(model="m", input="Hello.", max_output_tokens=2)
    headers = {"Authorization": f"Bearer {KEY_1}"}
    own_redis.stop()
    try:
        calls = [("POST", "/files", {"files": {"file": ("y.png", photo_bytes(24, 24))}}),
                 ("GET", f"/files/{file_id}", {}), ("GET", "/files", {}),
                 ("DELETE", f"/files/{file_id}", {}),
                 ("POST", "/chat/completions", {"json": {"messages": file_chat(file_id),
                                                         "max_tokens": 2}}),
                 ("GET", f"/responses/{made.id}", {}),
                 ("POST", "/responses", {"json": {"model": "m", "input": "More.",
                                                  "previous_response_id": made.id}})]
        for method, path, kw in calls:
            started = time.monotonic()
            assert_503(httpx.request(method, f"{keyed.api}{path}", headers=headers,
                                     timeout=60, **kw))
            assert time.monotonic() - started < 20, f"{method} {path} waited too long"
        # The replica itself is fine: health, and chats that need no stored state.
        assert httpx.get(f"{keyed.url}/health", timeout=10).status_code == 200
        text = client.chat.completions.create(model="m", max_tokens=2,
                                              messages=[{"role": "user", "content": "Hi"}])
        assert text.choices[0].message.content is not None
        assert "state store unavailable" in keyed.log()
    finally:
        own_redis.start()  # empty, on the same port: the client reconnects by itself
    assert exists(client, upload(client, seed=10))


def test_a_redis_that_hangs_is_a_503_not_a_hang(keyed: RunningServer,
                                                own_redis: RedisServer) -> None:
    client = sdk(keyed, KEY_1)
    file_id = upload(client, seed=11)
    # DEBUG SLEEP freezes the whole server: connections open, no answers.
    sleeper = threading.Thread(target=own_redis.command, args=("DEBUG", "SLEEP", "8"),
                               kwargs={"timeout": 60})
    sleeper.start()
    time.sleep(0.3)
    started = time.monotonic()
    answer = httpx.get(f"{keyed.api}/files/{file_id}", timeout=60,
                       headers={"Authorization": f"Bearer {KEY_1}"})
    assert_503(answer)
    assert time.monotonic() - started < 7  # state_timeout_s is 2: well before Redis wakes
    sleeper.join(60)
    assert exists(client, file_id)  # awake again: the same file, from the same Redis


# ---------- the nginx front: one address for uploads and chats ----------

@pytest.fixture(scope="module")
def front(replicas: list[RunningServer], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[str]:
    """nginx with replica B standing in for the router (vllm-router's own tests are the
    cluster's): Files calls go round robin to A and B, the rest to the router."""
    if nginx_binary() is None:
        skip_unless_ci("nginx is not installed (Debian: apt-get install nginx)")
    port = free_port()
    conf = write_nginx_conf(f"127.0.0.1:{port}", replicas[1].url, [r.url for r in replicas],
                            tmp_path_factory.mktemp("front") / "nginx.conf")
    process = launch_nginx(conf)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, "nginx exited"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "nginx never answered"
        time.sleep(0.1)
    yield url
    stop_process(process)


def uploads_counted(server: RunningServer) -> float:
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    line = next(x for x in metrics.splitlines() if x.startswith("vlserve_uploads_total "))
    return float(line.split()[1])


def test_uploads_and_chats_through_the_front(front: str, replicas: list[RunningServer]
                                             ) -> None:
    client = sdk(f"{front}/v1")
    before = [uploads_counted(r) for r in replicas]
    ids = [client.files.create(file=(f"{n}.png", io.BytesIO(photo_bytes(64, 48, seed=n))),
                               purpose="vision").id for n in (21, 22)]
    # Multipart went to the replicas directly, one each (round robin), never the router.
    assert [uploads_counted(r) - n for r, n in zip(replicas, before, strict=True)] == [1, 1]
    chat = client.chat.completions.create(
        model="m", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "Compare."},
            *({"type": "file", "file": {"file_id": i}} for i in ids)]}])
    assert chat.model_extra["timings"]["image_tokens"] > 0
    assert sdk(f"{front}/api/v1").files.retrieve(ids[0]).id == ids[0]


def test_stored_chat_completions_are_listed_through_the_front(front: str) -> None:
    """vllm-router serves POST /v1/chat/completions only (a GET there is its 405): the
    front sends the listing to the replicas, round robin, which read the shared store."""
    client = sdk(f"{front}/v1")
    made = client.chat.completions.create(model="m", max_tokens=1, store=True,
                                          messages=[{"role": "user", "content": "Hi"}])
    answered_by = set()
    for _ in range(2):
        listing = httpx.get(f"{front}/v1/chat/completions", params={"limit": 100}, timeout=30)
        assert listing.status_code == 200, listing.text
        assert made.id in {c["id"] for c in listing.json()["data"]}
        answered_by.add(listing.headers["X-Vlserve-Replica"])
    assert answered_by == {"a", "b"}  # not the router's (B here) alone
    assert client.chat.completions.retrieve(made.id).id == made.id


def test_the_front_keeps_the_routers_administration_to_itself(front: str) -> None:
    """vllm-router's /remove_worker, /workers, ... would let any client empty its list:
    the front answers 404 for them, in OpenAI's error shape, and never forwards them."""
    for method, path in (("POST", "/remove_worker?url=http://127.0.0.1:1"), ("GET", "/workers"),
                         ("POST", "/add_worker?url=http://10.0.0.1:80"), ("POST", "/flush_cache"),
                         ("GET", "/list_workers"), ("POST", "/start_profile")):
        answer = httpx.request(method, f"{front}{path}", timeout=10)
        assert answer.status_code == 404, (path, answer.text)
        assert answer.json()["error"]["code"] == "not_found", path  # the front's, not a replica's
    # A path that only starts alike is not the router's: it goes on to the router side.
    assert httpx.get(f"{front}/health", timeout=10).status_code == 200


def test_the_front_answers_openai_errors_when_nothing_is_up(tmp_path_factory:
                                                            pytest.TempPathFactory) -> None:
    if nginx_binary() is None:
        skip_unless_ci("nginx is not installed (Debian: apt-get install nginx)")
    port = free_port()
    conf = write_nginx_conf(f"127.0.0.1:{port}", f"http://127.0.0.1:{free_port()}",
                            [f"http://127.0.0.1:{free_port()}"],
                            tmp_path_factory.mktemp("front-down") / "nginx.conf")
    process = launch_nginx(conf, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/files", timeout=5,
                                    files={"file": ("a.png", b"x")})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.1)
        assert answer.status_code == 502
        assert answer.json()["error"]["code"] == "upstream_unavailable"
        chat = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
        assert chat.status_code == 502 and chat.json()["error"]["type"] == "server_error"
    finally:
        stop_process(process)
