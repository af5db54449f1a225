"""Incremental detokenization: whole UTF-8 characters only, stop strings held back."""

from __future__ import annotations

from server.engine.detokenize import TextStream


def feed(stream: TextStream, pieces: list[bytes]) -> str:
    return "".join(stream.push(p) for p in pieces) + stream.finish()


def test_multibyte_characters_split_across_tokens() -> None:
    data = "😀 漢字 é".encode()
    stream = TextStream()
    outputs = [stream.push(bytes([b])) for b in data]
    assert "".join(outputs) + stream.finish() == "😀 漢字 é"
    assert all("\ufffd" not in o for o in outputs)


def test_invalid_bytes_become_replacement_characters() -> None:
    assert feed(TextStream(), [b"ok", b"\xff", b"\xe6\xbc"]) == "ok\ufffd\ufffd"


def test_stop_string_across_pieces_is_cut() -> None:
    stream = TextStream(("END",))
    out = [stream.push(p) for p in [b"hello E", b"N", b"D and more"]]
    assert "".join(out) == "hello "
    assert stream.stopped
    assert stream.finish() == ""


def test_partial_stop_prefix_is_released_when_it_is_not_a_stop() -> None:
    stream = TextStream(("END",))
    assert stream.push(b"an E") == "an "
    assert stream.push(b"Nx") == "ENx"
    assert not stream.stopped


def test_held_back_text_is_flushed_at_the_end() -> None:
    stream = TextStream(("END",))
    assert stream.push(b"bye EN") == "bye "
    assert stream.finish() == "EN"
