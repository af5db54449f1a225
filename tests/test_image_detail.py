"""Per-image `detail` (low | high | auto): token counts by each projector's published rules,
through chat (data URL and file id) and /responses, and caches that never mix two sizes."""

from __future__ import annotations

import io
from collections.abc import Callable

import httpx
import openai
import pytest
from conftest import RunningServer
from helpers import data_url, expected_image_tokens, pattern_png, responses_create

# 8:3, wider than image_max_side: `high` keeps more than `auto`, and `low` hits its token
# budget (youtuvl 16 x 6 = 96 > 64 cells at 512 px; GLM-4V 18 x 7 = 126).
WIDTH, HEIGHT = 1280, 480
DETAILS = ("low", "auto", "high")


def image_part(url: str, detail: str | None) -> dict:
    image_url = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": image_url}


def chat(server: RunningServer, messages: list[dict]) -> dict:
    answer = httpx.post(f"{server.api}/chat/completions", timeout=120, json={
        "model": "m", "messages": messages, "max_tokens": 2, "temperature": 0})
    assert answer.status_code == 200, answer.text
    return answer.json()


def ask(part: dict, text: str = "Read the text in this picture.") -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}, part]}


def upload(server: RunningServer, png: bytes) -> str:
    client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=60)
    return client.files.create(file=("wide.png", io.BytesIO(png)), purpose="vision").id


def test_detail_sets_the_image_tokens_by_the_projectors_rules(
        family_server: RunningServer) -> None:
    server = family_server
    png = pattern_png(WIDTH, HEIGHT, seed=1401)
    file_id = upload(server, png)
    expected = {d: expected_image_tokens(server.family, WIDTH, HEIGHT, d) for d in DETAILS}
    if server.family == "llava":  # one fixed square whatever is asked: detail is ignored
        assert len(set(expected.values())) == 1
    else:
        assert expected["low"] < expected["auto"] < expected["high"]
    by_url = {d: chat(server, [ask(image_part(data_url(png), d))]) for d in DETAILS}
    file_parts = {d: {"type": "file", "file": {"file_id": file_id, "detail": d}}
                  for d in DETAILS}
    by_file = {d: chat(server, [ask(file_parts[d])]) for d in DETAILS}
    for detail in DETAILS:
        assert by_url[detail]["timings"]["image_tokens"] == expected[detail], detail
        assert by_file[detail]["timings"]["image_tokens"] == expected[detail], detail
        # The same prompt length either way: the upload was kept large enough for `high`.
        assert by_file[detail]["usage"]["prompt_tokens"] == \
            by_url[detail]["usage"]["prompt_tokens"]
    plain = chat(server, [ask(image_part(data_url(png), None))])  # no detail: auto
    assert plain["timings"]["image_tokens"] == expected["auto"]
    # OpenAI's "original" (no downscaling): the largest this server gives, `high`.
    original = [chat(server, [ask(image_part(data_url(png), "original"))]), chat(server, [
        ask({"type": "file", "file": {"file_id": file_id, "detail": "original"}})])]
    assert [o["timings"]["image_tokens"] for o in original] == [expected["high"]] * 2


def test_responses_input_image_detail(family_server: RunningServer) -> None:
    server = family_server
    png = pattern_png(WIDTH, HEIGHT, seed=1402)
    file_id = upload(server, png)
    for detail in ("low", "high"):
        want = expected_image_tokens(server.family, WIDTH, HEIGHT, detail)
        for image in ({"image_url": data_url(png)}, {"file_id": file_id}):
            response = responses_create(server, max_output_tokens=2, input=[
                {"role": "user", "content": [
                    {"type": "input_text", "text": "Read the text in this picture."},
                    {"type": "input_image", "detail": detail, **image}]}])
            timings = response.model_extra["timings"]  # type: ignore[index]
            assert timings["image_tokens"] == want, (detail, image.keys())


def parts_for(server: RunningServer, source: str, seed: int) -> tuple[Callable, int, int]:
    """A fresh image (by data URL or upload) as a part for each detail, and its low and high
    image-token counts."""
    png = pattern_png(WIDTH, HEIGHT, seed=seed)
    file_id = upload(server, png) if source == "file_id" else ""

    def part(detail: str) -> dict:
        if file_id:
            return {"type": "file", "file": {"file_id": file_id, "detail": detail}}
        return image_part(data_url(png), detail)
    return (part, expected_image_tokens(server.family, WIDTH, HEIGHT, "low"),
            expected_image_tokens(server.family, WIDTH, HEIGHT, "high"))


@pytest.mark.parametrize("source", ["data_url", "file_id"])
def test_low_then_high_of_one_image_is_encoded_anew(
        family_server: RunningServer, source: str) -> None:
    server = family_server
    if server.family == "llava":
        pytest.skip("fixed-size projector: low and high are the same image")
    part, low, high = parts_for(server, source, 1403 if source == "data_url" else 1404)
    first = chat(server, [ask(part("low"))])
    assert first["timings"]["image_tokens"] == low
    assert first["timings"]["image_cache_hits"] == 0
    # The same prompt with the image at `high`: the low embedding must not be taken for it
    # (the content hash is of the file's bytes, the same for both: the cache keys carry the
    # decoded size too), nor any KV past the text before the image.
    high_turn = chat(server, [ask(part("high"))])
    assert high_turn["timings"]["image_tokens"] == high
    assert high_turn["timings"]["image_cache_hits"] == 0
    assert high_turn["timings"]["image_encode"] > 0
    assert high_turn["usage"]["prompt_tokens_details"]["cached_tokens"] < \
        first["usage"]["prompt_tokens"] - low
    # Each size has its own entry: both are served from the cache now.
    for detail, tokens in (("low", low), ("high", high)):
        again = chat(server, [ask(part(detail), f"Once more, at {detail} detail.")])
        assert again["timings"]["image_tokens"] == tokens
        assert again["timings"]["image_cache_hits"] == 1, detail


@pytest.mark.parametrize("source", ["data_url", "file_id"])
def test_turn_two_at_high_keeps_turn_one_at_low(family_server: RunningServer,
                                                source: str) -> None:
    server = family_server
    if server.family == "llava":
        pytest.skip("fixed-size projector: low and high are the same image")
    part, low, high = parts_for(server, source, 1405 if source == "data_url" else 1406)
    turn1 = chat(server, [ask(part("low"))])
    reply = turn1["choices"][0]["message"]["content"]
    turn2 = chat(server, [ask(part("low")), {"role": "assistant", "content": reply},
                          ask(part("high"), "And at full size?")])
    # Turn 1's KV (its low image included: the one cache hit) is reused; the high image is
    # encoded, not taken from the low one's embedding.
    assert turn2["timings"]["image_tokens"] == low + high
    assert turn2["usage"]["prompt_tokens_details"]["cached_tokens"] >= \
        turn1["usage"]["prompt_tokens"] - 1
    assert turn2["timings"]["image_cache_hits"] == 1
    assert turn2["timings"]["image_encode"] > 0
