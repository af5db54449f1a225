"""Two API keys on one server: upload quotas per key, and what /models and /slots show.

Issue 21 rows 5 and 9: one key used to evict every other key's uploads (one LRU of 256 files
for all), and any key saw absolute model paths, the CPU's features and other keys' request
ids.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import Stream, photo_bytes

from server.demo_model import DemoModelPaths
from server.engine import ImageInput
from server.uploads import UploadRefused, UploadStore

K1 = "sk-tenant-one-1111"
K2 = "sk-tenant-two-2222"
LONG = 3000  # tokens: a stream long enough to be seen in /slots


@pytest.fixture(scope="module")
def two_keys(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[RunningServer]:
    """Default upload limits (256 files, so 128 per key), room for a long stream."""
    running = start_server(demo_model, tmp_path_factory.mktemp("two-keys") / "server.log",
                           "--n-ctx", "4096",
                           env={"VLSERVE_API_KEY": f"{K1},{K2}",
                                "VLSERVE_MAX_TOKENS_CAP": str(LONG)})
    yield running
    stop_server(running)


def sdk(server: RunningServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key=key, max_retries=0, timeout=60)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_one_key_uploading_257_files_evicts_only_its_own(two_keys: RunningServer) -> None:
    k1, k2 = sdk(two_keys, K1), sdk(two_keys, K2)
    kept = k1.files.create(file=("k1.png", io.BytesIO(photo_bytes(40, 30, seed=1))),
                           purpose="vision")
    png = photo_bytes(8, 8)

    def upload(i: int) -> str:
        return k2.files.create(file=(f"{i}.png", io.BytesIO(png)), purpose="vision").id

    k2_ids = [upload(0)]  # the first, so it is the oldest
    with ThreadPoolExecutor(4) as pool:
        k2_ids += list(pool.map(upload, range(1, 257)))

    assert k1.files.retrieve(kept.id).id == kept.id  # still there
    reply = k1.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "user",
        "content": [{"type": "file", "file": {"file_id": kept.id}}]}])
    assert reply.choices[0].finish_reason in ("stop", "length")
    # K2 keeps its quota (the store's 256 files split between 2 keys), newest first.
    listed = [f.id for f in k2.files.list()]
    assert len(listed) == 128 and set(listed) <= set(k2_ids)
    with pytest.raises(openai.NotFoundError):
        k2.files.retrieve(k2_ids[0])
    assert [f.id for f in k1.files.list()] == [kept.id]


def test_models_names_files_not_paths_and_no_cpu_features(two_keys: RunningServer) -> None:
    resp = httpx.get(f"{two_keys.api}/models", headers=auth(K2), timeout=10)
    assert resp.status_code == 200
    meta = resp.json()["data"][0]["meta"]
    assert meta["model_file"] == two_keys.models.text.name
    assert meta["mmproj_file"] == two_keys.models.mmproj.name
    assert {"model_path", "mmproj_path", "system_info"}.isdisjoint(meta)
    text = resp.text
    assert str(two_keys.models.text.parent) not in text and "AVX" not in text.upper()
    assert "n_ctx" in meta and "projector_on_gpu" in meta  # what clients may need stays
    assert "llama.cpp system info" in two_keys.log()  # operators find it in the log


def test_slots_show_each_key_its_own_requests_only(two_keys: RunningServer) -> None:
    secret = "k1-private-request-0001"
    body = {"messages": [{"role": "user", "content": "Go on and on."}], "max_tokens": LONG,
            "ignore_eos": True}

    def slot_ids(key: str) -> list[str | None]:
        resp = httpx.get(f"{two_keys.api}/slots", headers=auth(key), timeout=10)
        assert resp.status_code == 200
        return [s["request_id"] for s in resp.json()["slots"]]

    for _ in range(5):  # a bracket: K2's view taken while K1 sees its request both sides
        stream = Stream(two_keys.api, body, headers={**auth(K1), "X-Request-ID": secret})
        try:
            deadline = time.monotonic() + 30
            while secret not in slot_ids(K1):
                assert time.monotonic() < deadline, "K1's request never showed in /slots"
                time.sleep(0.01)
            resp = httpx.get(f"{two_keys.api}/slots", headers=auth(K2), timeout=10)
            still_running = secret in slot_ids(K1)
        finally:
            stream.hang_up()
        if still_running:
            break
    else:
        pytest.fail("K1's stream kept finishing between two polls")
    assert secret not in resp.text
    k2_view = resp.json()
    assert k2_view["busy_slots"] >= 1  # the load is still visible
    busy = [s for s in k2_view["slots"] if s["state"] != "idle"]
    assert busy and all(s["request_id"] is None and s["generated_tokens"] == 0 for s in busy)
    assert all("client" not in s for s in k2_view["slots"])


# --- the store itself ---------------------------------------------------------------------
def _image(n_bytes: int, tag: str) -> ImageInput:
    return ImageInput(b"\0" * n_bytes, 1, 1, tag)


def test_store_refuses_rather_than_evicting_another_owner() -> None:
    """Quotas that add up to more than the store: when it is full, the newcomer is refused
    (507) once it has nothing of its own left to evict; the other owner keeps everything."""
    store = UploadStore(4, 10_000, 3600, max_files_per_owner=3, max_bytes_per_owner=10_000)
    a = [store.add("a", "vision", 1, _image(10, f"a{i}"), owner="A") for i in range(3)]
    store.add("b", "vision", 1, _image(10, "b0"), owner="B")
    with pytest.raises(UploadRefused) as refused:
        store.add("c", "vision", 1, _image(10, "c0"), owner="C")
    assert refused.value.status == 507 and refused.value.code == "upload_store_full"
    b1 = store.add("b", "vision", 1, _image(10, "b1"), owner="B")  # evicts B's own oldest
    assert [f.id for f in store.list("A")] == [f.id for f in a]
    assert [f.id for f in store.list("B")] == [b1.id]
    assert store.owner_usage("A") == (3, 30)


def test_store_evicts_by_bytes_within_the_owner_and_refuses_one_file_over_quota() -> None:
    store = UploadStore(100, 1000, 3600, max_files_per_owner=100, max_bytes_per_owner=100)
    first = store.add("x", "vision", 1, _image(60, "x"), owner="A")
    store.get(first.id, "A")
    second = store.add("y", "vision", 1, _image(60, "y"), owner="A")  # 120 > 100: x goes
    assert [f.id for f in store.list("A")] == [second.id]
    with pytest.raises(UploadRefused) as refused:
        store.add("z", "vision", 1, _image(101, "z"), owner="A")
    assert refused.value.status == 413 and "quota is 100 bytes" in str(refused.value)


def test_per_key_defaults_split_the_store_among_the_keys() -> None:
    from server.config import load_settings
    from server.uploads import upload_store

    one = upload_store(load_settings(None))
    assert one.max_files_per_owner == 256 and one.max_bytes_per_owner == 512 * 1024 * 1024
    keyed = upload_store(load_settings(None, api_keys=["k1", "k2", "k3", "k4"]))
    assert keyed.max_files_per_owner == 64 and keyed.max_bytes_per_owner == 128 * 1024 * 1024
    set_ = upload_store(load_settings(None, api_keys=["k1", "k2"], upload_max_files_per_key=10,
                                      upload_store_mb_per_key=5))
    assert set_.max_files_per_owner == 10 and set_.max_bytes_per_owner == 5 * 1024 * 1024
    assert json.dumps(set_.list("nobody")) == "[]"


def test_stored_responses_belong_to_their_key(two_keys: RunningServer) -> None:
    """Responses are kept per key (the identity uploads use): another key's id is a 404
    everywhere, exactly as an unknown one, and its conversation cannot be continued."""
    k1, k2 = sdk(two_keys, K1), sdk(two_keys, K2)
    made = k1.responses.create(model="m", input="Mine.", max_output_tokens=2)
    for attempt in (lambda: k2.responses.retrieve(made.id),
                    lambda: k2.responses.input_items.list(made.id),
                    lambda: k2.responses.delete(made.id),
                    lambda: k2.responses.create(model="m", input="Yours?", max_output_tokens=1,
                                                previous_response_id=made.id)):
        with pytest.raises(openai.NotFoundError) as refused:
            attempt()
        assert refused.value.body["code"] == "response_not_found"  # type: ignore[index]
        assert "no stored response with id" in refused.value.body["message"]  # type: ignore[index]
    assert k1.responses.retrieve(made.id).output_text == made.output_text
    again = k1.responses.create(model="m", input="More.", max_output_tokens=1,
                                previous_response_id=made.id)
    assert again.usage is not None and made.usage is not None
    assert again.usage.input_tokens_details.cached_tokens >= made.usage.input_tokens


def test_conversations_belong_to_their_key(two_keys: RunningServer) -> None:
    """Another key's conversation is a 404 everywhere, exactly as an unknown one: it can be
    neither read, listed, changed, deleted nor continued."""
    k1, k2 = sdk(two_keys, K1), sdk(two_keys, K2)
    mine = k1.conversations.create(items=[{"role": "user", "content": "Mine."}])
    item = k1.conversations.items.list(mine.id).data[0]
    for attempt in (lambda: k2.conversations.retrieve(mine.id),
                    lambda: k2.conversations.update(mine.id, metadata={"a": "b"}),
                    lambda: k2.conversations.items.list(mine.id),
                    lambda: k2.conversations.items.retrieve(item.id, conversation_id=mine.id),
                    lambda: k2.conversations.items.create(mine.id, items=[
                        {"role": "user", "content": "Yours?"}]),
                    lambda: k2.conversations.items.delete(item.id, conversation_id=mine.id),
                    lambda: k2.conversations.delete(mine.id),
                    lambda: k2.responses.create(model="m", input="Yours?", max_output_tokens=1,
                                                conversation=mine.id)):
        with pytest.raises(openai.NotFoundError) as refused:
            attempt()
        assert refused.value.body["code"] == "conversation_not_found"  # type: ignore[index]
    assert [i.id for i in k1.conversations.items.list(mine.id).data] == [item.id]
    # Busy with K1's response, it is still unknown to K2 (not "locked": that would tell).
    running = k1.responses.create(model="m", input="Go on.", max_output_tokens=LONG,
                                  temperature=0, conversation=mine.id, background=True)
    with pytest.raises(openai.NotFoundError):
        k2.responses.create(model="m", input="Yours?", max_output_tokens=1,
                            conversation=mine.id)
    k1.responses.cancel(running.id)
    assert k1.responses.create(model="m", input="More.", max_output_tokens=1,
                               conversation=mine.id).usage is not None


def test_conversation_store_defaults_split_among_the_keys() -> None:
    from server.api.conversation_store import conversation_bounds
    from server.config import load_settings

    one = conversation_bounds(load_settings(None))
    assert one.max_count_per_owner == 1000 and one.max_bytes_per_owner == 256 * 1024 * 1024
    keyed = conversation_bounds(load_settings(None, api_keys=["k1", "k2", "k3", "k4"]))
    assert keyed.max_count_per_owner == 250 and keyed.max_bytes_per_owner == 64 * 1024 * 1024
    assert keyed.ttl_s == 30 * 86400 and keyed.lru


def test_response_store_defaults_split_among_the_keys() -> None:
    from server.api.response_store import response_store
    from server.config import load_settings

    one = response_store(load_settings(None))
    assert one.max_count_per_owner == 1000 and one.max_bytes_per_owner == 256 * 1024 * 1024
    keyed = response_store(load_settings(None, api_keys=["k1", "k2", "k3", "k4"]))
    assert keyed.max_count_per_owner == 250 and keyed.max_bytes_per_owner == 64 * 1024 * 1024


def test_changed_keys_split_every_store_again() -> None:
    """Pure logic: each of the four per-key stores, in memory, takes the new split (the
    server test in test_key_rotation.py shows it on uploads)."""
    from types import SimpleNamespace

    from server.api.chat_store import open_chat_store
    from server.api.conversation_store import open_conversations
    from server.api.key_shares import share_among
    from server.api.response_store import open_responses
    from server.config import load_settings
    from server.store import open_backend
    from server.uploads import open_uploads

    settings = load_settings(None, api_keys=["k1"], upload_max_files=40,
                             responses_max_stored=40, conversations_max_stored=40,
                             chat_completions_max_stored=40)
    backend = open_backend(settings.state_url)
    stores = [open_uploads(settings, backend), open_responses(settings, backend),
              open_conversations(settings, backend), open_chat_store(settings, backend)]
    assert [s.bounds.max_count_per_owner for s in stores] == [40] * 4
    share_among(SimpleNamespace(settings=settings, uploads=stores[0],  # type: ignore[arg-type]
                                responses=stores[1], conversations=stores[2],
                                chat_store=stores[3]), 4)
    assert [(s.bounds.max_count_per_owner, s.table.bounds.max_count_per_owner)
            for s in stores] == [(10, 10)] * 4
    assert all(s.bounds.max_count == 40 for s in stores)  # the store's own bounds stay
