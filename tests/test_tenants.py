"""With API keys, the engine's caches tell one key nothing about another's requests
(issue 21, row 4): the KV prefix cache and the image-embedding cache are per key, unless the
operator turns `cache_sharing` on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import data_url, image_message, metric_value, photo_bytes

from server.demo_model import DemoModelPaths

KEY_A, KEY_B = "tenant-a-key-0123456789", "tenant-b-key-9876543210"
SECRET = "You are the vault. The vault PIN for tenant A is 7391. Never say it."


def start(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory,
          sharing: bool) -> RunningServer:
    # One slot: every probe meets the other key's cache in the very slot it uses.
    return start_server(demo_model, tmp_path_factory.mktemp("tenants") / "server.log",
                        "--n-parallel", "1",
                        env={"VLSERVE_API_KEYS": f"{KEY_A},{KEY_B}",
                             "VLSERVE_CACHE_SHARING": "true" if sharing else "false"})


@pytest.fixture(scope="module")
def keyed(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[RunningServer]:
    running = start(demo_model, tmp_path_factory, sharing=False)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def sharing(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[RunningServer]:
    running = start(demo_model, tmp_path_factory, sharing=True)
    yield running
    stop_server(running)


def chat(server: RunningServer, key: str, messages: list[dict]) -> dict:
    answer = httpx.post(f"{server.api}/chat/completions", timeout=60,
                        headers={"Authorization": f"Bearer {key}"},
                        json={"messages": messages, "max_tokens": 2, "temperature": 0})
    assert answer.status_code == 200, answer.text
    return answer.json()


def pin_probe(server: RunningServer) -> dict[str, int]:
    """K1 holds a secret system prompt in the KV cache; K2 guesses its next digit."""
    seen = {}
    for digit in "0123456789":
        chat(server, KEY_A, [{"role": "system", "content": SECRET},
                             {"role": "user", "content": "Hello"}])
        guess = SECRET.replace("7391", digit)
        probe = chat(server, KEY_B, [{"role": "system", "content": guess},
                                     {"role": "user", "content": "Hello"}])
        seen[digit] = probe["usage"]["prompt_tokens_details"]["cached_tokens"]
    return seen


def test_pin_probe_learns_nothing_across_keys(keyed: RunningServer) -> None:
    seen = pin_probe(keyed)
    # No digit stands out. (K2's own earlier guesses, kept for it in RAM, give every guess
    # after the first the same shared start: its own history, not K1's.)
    later = [n for digit, n in seen.items() if digit != "0"]
    assert len(set(later)) == 1, seen
    # The cache still works within one key.
    secret = [{"role": "system", "content": SECRET}, {"role": "user", "content": "Hello"}]
    chat(keyed, KEY_A, secret)
    again = chat(keyed, KEY_A, secret)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 10


def test_cache_sharing_on_shares_and_so_reveals(sharing: RunningServer) -> None:
    seen = pin_probe(sharing)
    assert max(seen, key=lambda d: seen[d]) == "7", seen


def upload(server: RunningServer, key: str, image: bytes) -> dict:
    answer = httpx.post(f"{server.api}/files", timeout=60,
                        headers={"Authorization": f"Bearer {key}"},
                        files={"file": ("x.png", image, "image/png")})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_image_probe_learns_nothing_across_keys(keyed: RunningServer) -> None:
    x = photo_bytes(64, 48, seed=21)
    chat(keyed, KEY_A, [image_message("What is it?", data_url(x))])
    # K2 sending the same image encodes it itself: no hit, from cache or KV.
    probe = chat(keyed, KEY_B, [image_message("What is it?", data_url(x))])
    assert probe["timings"]["image_cache_hits"] == 0
    assert probe["timings"]["image_encode"] > 0
    # And the upload status does not say "someone encoded this already".
    y = photo_bytes(64, 48, seed=22)
    chat(keyed, KEY_A, [image_message("What is it?", data_url(y))])
    assert upload(keyed, KEY_B, y)["status"] == "uploaded"
    assert upload(keyed, KEY_A, y)["status"] == "processed"  # K1's own cache: a hit
    # K2's own pre-encode then serves K2.
    deadline = time.monotonic() + 30
    file_id = upload(keyed, KEY_B, y)["id"]
    while httpx.get(f"{keyed.api}/files/{file_id}", timeout=10,
                    headers={"Authorization": f"Bearer {KEY_B}"}).json()["status"] != \
            "processed":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def pixel_cache_hits(server: RunningServer) -> float:
    return metric_value(server.url, "vlserve_image_pixel_cache_hits_total", key=KEY_A)


def test_decoded_pixels_are_reused_within_a_key_only(keyed: RunningServer) -> None:
    """An image sent again (each turn of a chat does) skips its decode, for the key that
    sent it: another key decodes its own copy, so timing tells it nothing."""
    z = photo_bytes(640, 480, seed=23)
    before = pixel_cache_hits(keyed)
    first = chat(keyed, KEY_A, [image_message("What is it?", data_url(z))])
    assert first["timings"]["image_decode"] > 0
    assert pixel_cache_hits(keyed) == before
    again = chat(keyed, KEY_A, [image_message("And now?", data_url(z))])
    assert again["timings"]["image_decode"] == 0  # (image_resize holds mtmd's preprocessing)
    assert pixel_cache_hits(keyed) == before + 1
    other = chat(keyed, KEY_B, [image_message("What is it?", data_url(z))])
    assert other["timings"]["image_decode"] > 0
    assert pixel_cache_hits(keyed) == before + 1
