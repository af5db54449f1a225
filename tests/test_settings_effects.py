"""Settings that had no test: each one is set to a small value and seen to bind, on the real
server over HTTP (issue 15, Build 4). One server, keys read from --api-key-file; the
upload byte bound as pure logic."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import data_url, photo_bytes

from server.demo_model import DemoModelPaths
from server.engine.types import ImageInput
from server.uploads import UploadStore

KEY = "sk-from-the-file"
COMMENTED = "sk-commented-out"
TTL_S = 4.0
N_BATCH = 16
LONG = 2000


@pytest.fixture(scope="module")
def tuned(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("tuned")
    key_file = tmp / "keys"
    key_file.write_text(f"# operators' keys\n{KEY}\n# {COMMENTED}\n")
    running = start_server(demo_model, tmp / "server.log", "--n-parallel", "2",
                           "--n-ctx", "8192", "--api-key-file", str(key_file), env={
                               "VLSERVE_MAX_IMAGES_PER_REQUEST": "2",
                               "VLSERVE_UPLOAD_MAX_FILES": "3",
                               "VLSERVE_UPLOAD_TTL_S": str(TTL_S),
                               "VLSERVE_N_BATCH": str(N_BATCH),
                               "VLSERVE_N_UBATCH": str(N_BATCH),
                               "VLSERVE_MAX_TOKENS_CAP": str(LONG)})
    yield running
    stop_server(running)


def client(key: str = KEY) -> httpx.Client:
    return httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=120)


def chat(server: RunningServer, content: object, **params: object) -> httpx.Response:
    with client() as c:
        return c.post(f"{server.api}/chat/completions", json={
            "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, **params})


def upload(server: RunningServer, width: int, height: int, seed: int) -> str:
    with client() as c:
        answer = c.post(f"{server.api}/files", data={"purpose": "vision"},
                        files={"file": ("x.png", io.BytesIO(photo_bytes(width, height,
                                                                        seed=seed)))})
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def exists(server: RunningServer, file_id: str) -> bool:
    with client() as c:
        status = c.get(f"{server.api}/files/{file_id}").status_code
    assert status in (200, 404)
    return status == 200


# ---------- api_key_file ----------

def test_keys_come_from_the_key_file(tuned: RunningServer) -> None:
    with client() as c:
        assert c.get(f"{tuned.api}/models").status_code == 200
    for key in (COMMENTED, "# operators' keys", "sk-unknown"):
        with client(key) as c:
            refused = c.get(f"{tuned.api}/models")
        assert refused.status_code == 401, key
        assert refused.json()["error"]["code"] == "invalid_api_key"


# ---------- max_images_per_request ----------

def test_max_images_per_request_binds(tuned: RunningServer) -> None:
    image = {"type": "image_url", "image_url": {"url": data_url(photo_bytes(40, 30))}}
    two = chat(tuned, [{"type": "text", "text": "Compare."}, image, image])
    assert two.status_code == 200, two.text
    three = chat(tuned, [{"type": "text", "text": "Compare."}, image, image, image])
    assert three.status_code == 400
    assert three.json()["error"]["message"].endswith("too many images (limit 2)"), three.text


# ---------- uploads: upload_max_files, upload_store_mb, upload_ttl_s ----------

def test_upload_max_files_evicts_the_least_recently_used(tuned: RunningServer) -> None:
    ids = [upload(tuned, 20, 20, seed=i) for i in range(3)]
    assert exists(tuned, ids[0])  # touched: now ids[1] is the least recently used
    fourth = upload(tuned, 20, 20, seed=3)
    assert [exists(tuned, i) for i in (*ids, fourth)] == [True, False, True, True]


def test_upload_store_mb_evicts_by_decoded_size() -> None:
    """Pure logic (uploads are decoded to the projector's size, so filling megabytes over
    HTTP takes hundreds of files): the byte bound evicts the least recently used first."""
    store = UploadStore(max_files=10, max_bytes=1000, ttl_s=3600)
    image = [ImageInput(bytes(400), 1, 400 // 3, f"h{i}") for i in range(3)]
    ids = [store.add("x.png", "vision", 400, image[i]).id for i in range(3)]
    assert [store.get(i) is not None for i in ids] == [False, True, True]
    store.add("y.png", "vision", 400, ImageInput(bytes(1000), 1, 333, "big"))
    assert all(store.get(i) is None for i in ids)  # the whole store for one file


def test_uploads_expire_after_upload_ttl_s(tuned: RunningServer) -> None:
    file_id = upload(tuned, 20, 20, seed=20)
    uploaded = time.monotonic()
    assert exists(tuned, file_id)
    while exists(tuned, file_id):
        assert time.monotonic() - uploaded < TTL_S + 30, "never expired"
        time.sleep(0.2)
    assert time.monotonic() - uploaded >= TTL_S - 0.5


# ---------- top_k, min_p, penalties ----------

def text(answer: httpx.Response) -> str:
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["message"]["content"]


def test_top_k_and_min_p_change_what_is_sampled(tuned: RunningServer) -> None:
    prompt = "Write freely."
    params = {"max_tokens": 24, "ignore_eos": True}
    greedy = text(chat(tuned, prompt, temperature=0, **params))
    sampled = [text(chat(tuned, prompt, temperature=1.0, seed=seed, **params))
               for seed in (1, 2, 3)]
    assert all(s != greedy for s in sampled)  # at temperature 1 the model wanders
    # One candidate left, whatever the seed: the greedy answer.
    for seed in (1, 2, 3):
        assert text(chat(tuned, prompt, temperature=1.0, seed=seed, top_k=1, **params)) == greedy
        assert text(chat(tuned, prompt, temperature=1.0, seed=seed, min_p=1.0, top_k=0,
                         **params)) == greedy


@pytest.mark.parametrize("penalty", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                                     {"repeat_penalty": 2.0}])
def test_penalties_change_a_greedy_answer(tuned: RunningServer, penalty: dict) -> None:
    prompt = "Repeat after me."
    # Long enough for the greedy answer to come back to tokens it used (random weights loop).
    params = {"max_tokens": 300, "ignore_eos": True, "temperature": 0}
    plain = text(chat(tuned, prompt, **params))
    assert text(chat(tuned, prompt, **params)) == plain  # greedy is reproducible
    assert text(chat(tuned, prompt, **params, **penalty)) != plain


# ---------- chunked prefill ----------

def test_a_prompt_longer_than_n_batch_is_prefilled_while_another_stream_decodes(
        tuned: RunningServer) -> None:
    """The long prompt goes in n_batch-token chunks, one per step, each step also carrying
    the stream's next token: /slots catches the long one mid-prefill twice, with the stream
    further along the second time. Prefilled in one step, it would never be seen so."""
    stop = threading.Event()
    streaming_id: list[str] = []

    def stream() -> None:
        with client() as c, c.stream("POST", f"{tuned.api}/chat/completions", json={
                "messages": [{"role": "user", "content": "Go on."}], "max_tokens": LONG,
                "ignore_eos": True, "stream": True, "temperature": 0}) as answer:
            for line in answer.iter_lines():
                if line.startswith("data: {") and not streaming_id:
                    streaming_id.append(json.loads(line[6:])["id"])
                if stop.is_set():
                    return

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    deadline = time.monotonic() + 60
    while not streaming_id:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    long_prompt = " ".join(f"word{i}" for i in range(600))  # far more than N_BATCH tokens
    result: list[httpx.Response] = []
    prefill = threading.Thread(target=lambda: result.append(
        chat(tuned, long_prompt, max_tokens=1)), daemon=True)
    prefill.start()
    seen: list[tuple[int, int]] = []  # (long request's n_past, stream's tokens) mid-prefill
    with client() as c:
        while prefill.is_alive() and len(seen) < 2:
            slots = c.get(f"{tuned.api}/slots").json()["slots"]
            mine = {s["request_id"]: s for s in slots if s["request_id"]}
            other = [s for rid, s in mine.items() if rid not in streaming_id]
            if other and other[0]["state"] == "prefill" and 0 < other[0]["n_past"] and \
                    (not seen or other[0]["n_past"] > seen[-1][0]):
                seen.append((other[0]["n_past"], mine[streaming_id[0]]["generated_tokens"]))
    stop.set()
    prefill.join(120)
    assert result and result[0].status_code == 200, result
    prompt_tokens = result[0].json()["usage"]["prompt_tokens"]
    assert prompt_tokens > 20 * N_BATCH
    assert len(seen) == 2, seen
    (past_1, generated_1), (past_2, generated_2) = seen
    assert past_2 > past_1 and generated_2 > generated_1, seen
