"""Property tests (hypothesis) for the pure parts: prompt rendering, images, detokenization,
and what parses untrusted request input (image references, JSON depth, auth and id headers,
request models)."""

from __future__ import annotations

import base64
import io
import json

import pydantic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from server.api.auth import bearer_token
from server.api.json_depth import json_depth
from server.api.observe import MAX_REQUEST_ID_LENGTH, client_request_id
from server.api.protocol import ChatCompletionRequest
from server.demo_model import LLAVA_CHAT_TEMPLATE
from server.engine.detokenize import TextStream
from server.engine.prompt import ChatTemplate
from server.engine.types import ChatMessage, ImageInput
from server.images import ImageError, decode_image, image_bytes_from_url

MARKER = "<__media__>"
IMAGE = ImageInput(b"\0" * 12, 2, 2, "h")
TEMPLATE = ChatTemplate(LLAVA_CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>",
                        media_marker=MARKER)

parts = st.lists(st.one_of(st.text(max_size=40), st.just(IMAGE)), min_size=1, max_size=4)
messages = st.lists(
    st.builds(lambda role, p: ChatMessage(role, tuple(p)),
              st.sampled_from(["system", "user", "assistant"]), parts),
    min_size=1, max_size=6)


@given(messages, st.one_of(st.none(), st.text(max_size=30)))
def test_rendering_never_crashes(msgs: list[ChatMessage], system: str | None) -> None:
    rendered = TEMPLATE.render(msgs, system)
    # Client text (markers typed in it included) is user text; the markup holds one marker
    # per image, and joined back the segments are the text the template rendered.
    markup = "".join(s.text for s in rendered.segments if not s.user)
    assert markup.count(MARKER) == len(rendered.images)
    client = [p for m in msgs for p in m.parts if isinstance(p, str) and p]
    user = "".join(s.text for s in rendered.segments if s.user)
    assert sum(len(p) for p in client) + (len(system or "") if not any(
        m.role == "system" for m in msgs) else 0) == len(user)
    assert rendered.text.endswith("ASSISTANT:")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_are_an_image_error_or_pixels(data: bytes) -> None:
    try:
        image = decode_image(data, 64)
    except ImageError:
        return
    assert len(image.rgb) == image.width * image.height * 3
    assert 1 <= max(image.width, image.height) <= 64


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "CMYK"]),
    st.integers(1, 300), st.integers(1, 300),
    st.sampled_from(["PNG", "JPEG", "WEBP", "GIF", "BMP"]),
    st.integers(16, 256),
)
def test_valid_images_come_out_bounded_rgb(mode: str, width: int, height: int, fmt: str,
                                           max_side: int) -> None:
    image = Image.new(mode, (width, height))
    buf = io.BytesIO()
    try:
        image.save(buf, fmt)
    except (OSError, ValueError, KeyError):
        return  # this Pillow cannot write that mode in that format: nothing to test
    try:
        out = decode_image(buf.getvalue(), max_side)
    except ImageError:
        assert min(width, height) < 2  # the only refusal a valid image may get: min_side
        return
    assert max(out.width, out.height) <= max(max_side, 1)
    assert len(out.rgb) == out.width * out.height * 3


@given(st.lists(st.binary(max_size=6), max_size=40), st.lists(st.text(min_size=1, max_size=4),
                                                                max_size=3))
def test_streamed_text_is_always_valid_and_complete(pieces: list[bytes],
                                                    stops: list[str]) -> None:
    stream = TextStream(tuple(stops))
    out = "".join(stream.push(p) for p in pieces) + stream.finish()
    out.encode("utf-8")  # never a lone surrogate or broken character
    whole = b"".join(pieces).decode("utf-8", errors="replace")
    if stream.stopped:
        assert whole.startswith(out) and any(s in whole for s in stops)
    else:
        assert out == whole


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                               max_size=4),
    max_leaves=40)


def nesting(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(nesting, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(nesting, value.values()), default=0)
    return 0


@given(json_values, st.booleans())
def test_json_depth_is_the_parsed_nesting(value: object, ascii_only: bool) -> None:
    # Strings (keys too) full of brackets, quotes and backslashes are text, not structure.
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert json_depth(text) == nesting(value)


@given(json_values, st.integers(1, 9))
def test_json_shape_is_the_same_cut_in_small_chunks(value: object, chunk: int) -> None:
    """Strings, escapes and backslash runs that straddle the scan's chunks."""
    from server.api import json_depth as module

    text = json.dumps(value).encode()
    whole = module.json_shape(text)
    saved = module._CHUNK
    module._CHUNK = chunk
    try:
        assert module.json_shape(text) == whole
    finally:
        module._CHUNK = saved
    assert whole.containers == text.count(b"[") + text.count(b"{") - sum(
        s.count("[") + s.count("{") for s in strings(value))


def strings(value: object) -> list[str]:
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    if isinstance(value, dict):
        return [*value.keys(), *(s for v in value.values() for s in strings(v))]
    return [value] if isinstance(value, str) else []


@given(st.binary(max_size=300))
def test_json_depth_never_fails_on_garbage(data: bytes) -> None:
    assert json_depth(data) >= 0


image_urls = st.one_of(
    st.text(max_size=120),
    st.binary(max_size=120).map(lambda b: "data:image/png;base64," + base64.b64encode(b)
                                .decode()),
    st.from_regex(r"\Adata:[a-z/+.-]{0,20}(;[a-z]+=[a-z0-9]+)?(;base64)?,[A-Za-z0-9+/=\s]{0,40}"
                  r"\Z"),
    st.from_regex(r"\A(https?|file|ftp|gopher|HTTP)://[^\s]{0,30}\Z"),
)


@settings(max_examples=300)
@given(image_urls)
def test_any_image_reference_is_bytes_or_an_image_error(url: str) -> None:
    try:
        data = image_bytes_from_url(url)
    except ImageError:
        return
    assert isinstance(data, bytes) and data
    assert not url.lower().startswith(("http://", "https://", "file:", "ftp:"))


@given(st.binary(max_size=80))
def test_bearer_token_never_fails(value: bytes) -> None:
    token = bearer_token([(b"authorization", value)])
    assert token is None or (token and token == token.strip())


@given(st.text(max_size=200))
def test_request_ids_are_printable_and_short(value: str) -> None:
    out = client_request_id(value)
    assert out is None or (0 < len(out) <= MAX_REQUEST_ID_LENGTH and out.isprintable()
                           and out.isascii())


request_fields = st.dictionaries(
    st.sampled_from(["max_tokens", "temperature", "top_k", "seed", "stream", "logprobs",
                     "top_logprobs", "stop", "n", "top_p", "model"]),
    st.one_of(st.none(), st.booleans(), st.integers(-5, 50), st.floats(-3, 50),
              st.text(max_size=5), st.lists(st.text(max_size=3), max_size=6)),
    max_size=6)


@given(request_fields)
def test_request_fields_validate_or_fail_cleanly(fields: dict) -> None:
    """Only pydantic's own error, and a value of the declared type when it passes."""
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    try:
        request = ChatCompletionRequest.model_validate(body)
    except pydantic.ValidationError:
        return
    for name in ("max_tokens", "top_k", "seed", "n", "top_logprobs"):
        value = getattr(request, name)
        assert value is None or (type(value) is int)
    assert isinstance(request.stream, bool)
    if isinstance(fields.get("max_tokens"), float):
        assert fields["max_tokens"].is_integer()  # 3.0 passes as 3; 3.5 does not
