"""The chat API end to end: real server, real engine, real openai SDK; every test runs on
both model families (LLaVA-style and Youtu-VL-style tiny models)."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib

import httpx
import openai
import pytest
from conftest import TEST_DEFAULT_MAX_TOKENS, TEST_MAX_TOKENS_CAP, TEST_N_CTX, RunningServer
from helpers import data_url, expected_image_tokens, image_message, pattern_png, photo_bytes
from PIL import Image

from server.timings import SEQUENTIAL_STAGES, STAGES


@pytest.fixture
def server(family_server: RunningServer) -> RunningServer:
    return family_server


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=60)


def assert_timings(timings: dict) -> None:
    for stage in STAGES:
        assert timings[stage] >= 0, stage
    sequential = sum(timings[s] for s in SEQUENTIAL_STAGES)
    # Sequential stages add up to at most the total (plus rounding); the gaps between
    # them (HTTP parsing, hand-offs) are small.
    assert sequential <= timings["total"] + 1.0
    assert timings["first_token"] <= timings["total"] + 0.01
    assert timings["total"] - sequential < max(250.0, 0.5 * timings["total"])


def test_text_chat(client: openai.OpenAI, server: RunningServer) -> None:
    reply = client.chat.completions.create(
        model="vlserve-demo-llava",
        messages=[{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Hello, who are you?"}],
        max_tokens=8, temperature=0,
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.model == server.model_name
    assert reply.id.startswith("chatcmpl-")
    assert 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    timings = reply.model_extra["timings"]
    assert_timings(timings)
    assert timings["image_tokens"] == 0
    assert timings["completion_tokens"] == reply.usage.completion_tokens


def test_image_chat_data_url_and_raw_base64(client: openai.OpenAI, server: RunningServer
                                            ) -> None:
    png = photo_bytes(320, 240, "PNG")
    jpeg = photo_bytes(640, 360, "JPEG", seed=3)
    for url, size in ((data_url(png), (320, 240)), (base64.b64encode(jpeg).decode(), (640, 360))):
        reply = client.chat.completions.create(
            model="vlserve-demo-llava",
            messages=[image_message("What is in this picture?", url)],
            max_tokens=6, temperature=0,
        )
        timings = reply.model_extra["timings"]
        assert reply.choices[0].message.content
        assert timings["image_tokens"] == expected_image_tokens(server.family, *size)
        assert timings["image_decode"] > 0
        assert timings["image_encode"] > 0
        assert reply.usage.prompt_tokens > timings["image_tokens"]
        assert_timings(timings)


@pytest.mark.parametrize("width, height", [
    (448, 448), (640, 360), (360, 640), (1024, 256), (2048, 512),
], ids=["1:1", "16:9", "9:16", "4:1", "4:1-over-max-side"])
def test_aspect_ratios_give_the_projectors_token_counts(client: openai.OpenAI,
                                                        server: RunningServer,
                                                        width: int, height: int) -> None:
    reply = client.chat.completions.create(
        model="m", max_tokens=3, temperature=0,
        messages=[image_message("What shape is this?",
                                data_url(pattern_png(width, height, seed=width)))],
    )
    timings = reply.model_extra["timings"]
    assert timings["image_tokens"] == expected_image_tokens(server.family, width, height)
    assert reply.usage.prompt_tokens > timings["image_tokens"]
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert_timings(timings)


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="vlserve-demo-llava",
        messages=[image_message("Describe it.", data_url(photo_bytes()))],
        max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == [finishes[-1]] and finishes[-1] in ("stop", "length")
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens <= 10
    assert_timings(usage_chunk.model_extra["timings"])
    # Same request without streaming gives the same text (greedy, same prompt).
    reply = client.chat.completions.create(
        model="vlserve-demo-llava",
        messages=[image_message("Describe it.", data_url(photo_bytes()))],
        max_tokens=10, temperature=0,
    )
    assert reply.choices[0].message.content == text


def test_stream_ends_with_done(server: RunningServer) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.api}/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_max_tokens_enforced(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="vlserve-demo-llava", messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=3, temperature=0, extra_body={"ignore_eos": True},
    )
    assert reply.usage.completion_tokens == 3
    assert reply.choices[0].finish_reason == "length"


def test_omitted_max_tokens_uses_config_default(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="vlserve-demo-llava", messages=[{"role": "user", "content": "Tell a long story."}],
        temperature=0, extra_body={"ignore_eos": True},
    )
    assert reply.usage.completion_tokens == TEST_DEFAULT_MAX_TOKENS
    assert reply.choices[0].finish_reason == "length"


def test_max_tokens_above_cap_is_clipped(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="vlserve-demo-llava", messages=[{"role": "user", "content": "Tell a long story."}],
        max_completion_tokens=100_000, temperature=0, extra_body={"ignore_eos": True},
    )
    assert reply.usage.completion_tokens == TEST_MAX_TOKENS_CAP
    assert reply.choices[0].finish_reason == "length"


def test_prompt_longer_than_context_is_400(client: openai.OpenAI, server: RunningServer) -> None:
    long_text = "the image " * TEST_N_CTX
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="vlserve-demo-llava", messages=[{"role": "user", "content": long_text}],
            max_tokens=4,
        )
    assert err.value.status_code == 400
    message = err.value.body["message"]
    assert "tokens" in message and str(TEST_N_CTX - 1) in message
    assert err.value.body["code"] == "context_length_exceeded"
    # The server keeps serving.
    ok = client.chat.completions.create(
        model="vlserve-demo-llava", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.choices[0].message.content is not None


def _png_header_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG signature and IHDR claiming a huge image, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "TIFF")
    return buf.getvalue()


def _b64(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# The bad-input corpus: each gets a 4xx naming the part, and the server keeps serving.
@pytest.mark.parametrize("url", [
    "data:image/png;base64,!!!not-base64!!!",
    _b64(b"definitely not an image"),
    "data:text/plain;base64,aGVsbG8=",
    _b64(photo_bytes(64, 48, "JPEG")[:300], "image/jpeg"),  # truncated JPEG
    _b64(b""),  # 0 bytes
    _b64(photo_bytes(1, 1, "PNG")),  # 1x1
    _b64(_png_header_bomb()),  # 30000x30000 header, decompression bomb
    _b64(_tiff(), "image/tiff"),  # unsupported format
    _b64(photo_bytes(8, 8, "PNG"), "application/octet-stream"),  # wrong mime
    "http://127.0.0.1:1/cat.jpg",  # remote fetching is off
    "file:///etc/passwd",
    "",
], ids=["bad-base64", "not-image", "text-mime", "truncated-jpeg", "empty", "1x1",
        "png-bomb", "tiff", "octet-mime", "http", "file", "blank"])
def test_bad_image_is_400_and_server_keeps_serving(server: RunningServer, url: str) -> None:
    body = {"messages": [image_message("what?", url)], "max_tokens": 2}
    resp = httpx.post(f"{server.api}/chat/completions", json=body, timeout=30)
    assert resp.status_code in (400, 413), resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages.0.content.1.image_url"
    assert "Traceback" not in resp.text and "/etc/passwd" not in error["message"]
    good = httpx.post(f"{server.api}/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert good.status_code == 200


@pytest.mark.parametrize("body", [
    {},
    {"messages": []},
    {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": [{"role": "user", "content": [{"type": "audio", "data": "x"}]}]},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": 7},
    {"messages": [{"role": "user", "content": "hi"}], "n": 3},  # above n_parallel (2)
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
    {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
    {"messages": "hello"},
])
def test_invalid_requests_get_openai_errors(server: RunningServer, body: dict) -> None:
    resp = httpx.post(f"{server.api}/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"


def test_malformed_json_is_400(server: RunningServer) -> None:
    resp = httpx.post(f"{server.api}/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_server_timing_header_and_request_id(server: RunningServer) -> None:
    resp = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert resp.status_code == 200
    header = resp.headers["server-timing"]
    for stage in STAGES:
        assert f"{stage};dur=" in header
    assert resp.headers["x-request-id"] == resp.json()["id"]


def test_stop_string_cuts_the_answer(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Say something long."}]
    full = client.chat.completions.create(model="m", messages=messages, max_tokens=16,
                                          temperature=0).choices[0].message.content
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = client.chat.completions.create(model="m", messages=messages, max_tokens=16,
                                         temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Pick random words."}]
    answers = {
        client.chat.completions.create(model="m", messages=messages, max_tokens=12,
                                       temperature=1.0, top_p=0.9, seed=1234)
        .choices[0].message.content
        for _ in range(2)
    }
    assert len(answers) == 1


def test_what_the_sdk_may_send_is_taken_as_openai_means_it(client: openai.OpenAI,
                                                           server: RunningServer) -> None:
    """Fields OpenAI's spec allows that were 400s: explicit nulls for its nullable booleans
    (the SDK sends `stream=None` as null), top_p 0 (the likeliest token only, i.e. greedy)
    and efforts above "high" (an image's "original" detail: tests/test_image_detail.py)."""
    messages = [{"role": "user", "content": "Name some colours."}]
    nulls = httpx.post(f"{server.api}/chat/completions", timeout=60, json={
        "messages": messages, "max_tokens": 6, "temperature": 0, "stream": None})
    assert nulls.status_code == 200, nulls.text
    assert nulls.json()["object"] == "chat.completion"  # null is not a stream
    greedy = nulls.json()["choices"][0]["message"]["content"]
    top_p_zero = client.chat.completions.create(model="m", messages=messages, max_tokens=6,
                                                temperature=1.5, top_p=0, seed=7)
    assert top_p_zero.choices[0].message.content == greedy
    text = httpx.post(f"{server.api}/completions", timeout=60, json={
        "prompt": "Colours:", "max_tokens": 2, "echo": None, "stream": None})
    assert text.status_code == 200, text.text
    assert not text.json()["choices"][0]["text"].startswith("Colours:")  # null echo: off
    for effort in ("xhigh", "max"):
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=2,
                                               reasoning_effort=effort)  # type: ignore[arg-type]
        assert reply.choices[0].finish_reason in ("length", "stop")


def test_a_bad_field_under_a_union_is_named_in_the_error(server: RunningServer) -> None:
    """A bad image part used to be reported as the union's first branch: "content: Input
    should be a valid string". The error names the field that is wrong."""
    resp = httpx.post(f"{server.api}/chat/completions", timeout=30, json={"messages": [{
        "role": "user", "content": [{"type": "text", "text": "hi"}, {
            "type": "image_url", "image_url": {"url": "data:,", "detail": "huge"}}]}]})
    assert resp.status_code == 400
    error = resp.json()["error"]
    # As the request spells it: no union labels, no discriminator tags.
    assert error["param"] == "messages.0.content.1.image_url.detail", error
    assert "'original'" in error["message"] and "valid string" not in error["message"]
    # At equal depth, the real problem rather than a branch's type mismatch.
    long = httpx.post(f"{server.api}/responses", timeout=30, json={"input": ["x"] * 3000})
    assert long.status_code == 400
    assert long.json()["error"]["param"] == "input"
    assert "at most 2048 items" in long.json()["error"]["message"]


def test_concurrent_requests_all_complete(server: RunningServer) -> None:
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.api, api_key="x", max_retries=0) as aio:
            async def one(i: int) -> str:
                reply = await aio.chat.completions.create(
                    model="m", max_tokens=8, temperature=0,
                    messages=[image_message(f"Question number {i}?", data_url(photo_bytes(
                        160, 120, seed=i)))] if i % 2 else [{"role": "user", "content": f"q {i}"}],
                )
                assert reply.choices[0].finish_reason in ("stop", "length")
                return reply.choices[0].message.content or ""
            return list(await asyncio.gather(*(one(i) for i in range(4))))

    answers = asyncio.run(run())
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)


def test_multi_turn_multi_image_reuses_the_prefix(client: openai.OpenAI, server: RunningServer
                                                  ) -> None:
    first = data_url(photo_bytes(200, 150, seed=11))
    second = data_url(photo_bytes(150, 200, "JPEG", seed=12), "image/jpeg")
    turn1 = [{"role": "user", "content": [
        {"type": "text", "text": "Compare these."},
        {"type": "image_url", "image_url": {"url": first}},
        {"type": "image_url", "image_url": {"url": second}}]}]
    reply1 = client.chat.completions.create(model="m", messages=turn1, max_tokens=6,
                                            temperature=0)
    n_image = sum(expected_image_tokens(server.family, w, h) for w, h in ((200, 150), (150, 200)))
    assert reply1.model_extra["timings"]["image_tokens"] == n_image
    turn2 = [*turn1, {"role": "assistant", "content": reply1.choices[0].message.content},
             {"role": "user", "content": "And the second one?"}]
    reply2 = client.chat.completions.create(model="m", messages=turn2, max_tokens=6,
                                            temperature=0)
    cached = reply2.usage.prompt_tokens_details.cached_tokens
    assert cached >= n_image, "turn 2 should keep both images and turn 1 in the KV cache"
    assert reply2.model_extra["timings"]["image_encode"] == 0
    assert reply2.model_extra["timings"]["cached_tokens"] == cached


def test_models_endpoint(server: RunningServer) -> None:
    for prefix in ("/api/v1", "/v1"):
        body = httpx.get(f"{server.url}{prefix}/models", timeout=10).json()
        assert body["object"] == "list"
        card = body["data"][0]
        assert card["id"] == server.model_name
        assert card["meta"]["state"] == "ok"
        assert card["meta"]["projector_on_gpu"] is False
    missing = httpx.get(f"{server.api}/models/nope", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_health_and_request_log(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    log = server.log()
    assert "warm-up done" in log
    assert '"event": "chat_completion"' in log
    assert "RANDOM weights" not in log  # only printed when serve generates the demo model


def test_oversized_inline_image_is_413(server: RunningServer) -> None:
    payload = base64.b64encode(b"\xff\xd8\xff" + b"\0" * (21 * 1024 * 1024)).decode()
    body = {"messages": [image_message("big?", f"data:image/jpeg;base64,{payload}")],
            "max_tokens": 2}
    resp = httpx.post(f"{server.api}/chat/completions", json=body, timeout=60)
    assert resp.status_code == 413, resp.text[:300]
    assert resp.json()["error"]["param"] == "messages.0.content.1.image_url"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize(("extra", "param"), [
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
])
def test_an_audio_answer_is_refused_not_answered_in_text(server: RunningServer, extra: dict,
                                                         param: str) -> None:
    """An app asking for audio reads `message.audio`: a text-only answer would leave it
    with nothing, so the request is refused, naming the field."""
    answer = httpx.post(f"{server.api}/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], **extra})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["code"] == "audio_not_supported"
    text_only = httpx.post(f"{server.api}/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "modalities": ["text"],
        "max_tokens": 1})
    assert text_only.status_code == 200


@pytest.mark.parametrize(("extra", "param", "code"), [
    ({"web_search_options": {}}, "web_search_options", "unsupported_parameter"),
    ({"web_search_options": {"search_context_size": "low"}}, "web_search_options",
     "unsupported_parameter"),
    ({"verbosity": "low"}, "verbosity", "unsupported_value"),
    ({"verbosity": "high"}, "verbosity", "unsupported_value"),
    ({"verbosity": "loud"}, "verbosity", None),  # not one of OpenAI's values at all
    ({"service_tier": 5}, "service_tier", None),
])
def test_fields_it_cannot_serve_are_refused_by_name(server: RunningServer, extra: dict,
                                                    param: str, code: str | None) -> None:
    """A web search or terse answers silently not done would pass for done."""
    answer = httpx.post(f"{server.api}/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **extra})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def test_service_tier_is_answered_as_default_whole_and_streamed(
        server: RunningServer, client: openai.OpenAI) -> None:
    """One tier here: "priority" runs as any request does, and the answer says so."""
    asked = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
             "verbosity": "medium"}
    for tier in ("priority", "fast", "a tier named later"):  # any name: one tier here
        whole = client.chat.completions.create(**asked, service_tier=tier)  # type: ignore
        assert whole.service_tier == "default"
    chunks = list(client.chat.completions.create(**asked, service_tier="flex", stream=True))
    assert chunks and all(chunk.service_tier == "default" for chunk in chunks)
    plain = httpx.post(f"{server.api}/chat/completions", json=asked, timeout=30).json()
    assert "service_tier" not in plain
