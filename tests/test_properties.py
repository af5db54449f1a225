"""Property tests (hypothesis) for the pure parts: prompt rendering, images, detokenization."""

from __future__ import annotations

import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from server.demo_model import LLAVA_CHAT_TEMPLATE
from server.engine.detokenize import TextStream
from server.engine.prompt import ChatTemplate, PromptError
from server.engine.types import ChatMessage, ImageInput
from server.images import ImageError, decode_image

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
    try:
        rendered = TEMPLATE.render(msgs, system)
    except PromptError:
        # Only a message that smuggles the media marker in as text may be refused.
        assert any(MARKER in p for m in msgs for p in m.parts if isinstance(p, str)) or \
            (system is not None and MARKER in system)
        return
    assert rendered.text.count(MARKER) == len(rendered.images)
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
