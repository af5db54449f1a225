"""The generated demo model loads and runs in the real llama.cpp (text + mtmd vision path)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np
import pytest

from server.demo_model import LLAVA_CHAT_TEMPLATE, DemoModelPaths, make_demo_model
from server.demo_model.config import CONFIGS
from server.demo_model.gguf_file import write_gguf_atomically
from server.demo_model.vocab import BOS_ID, EOS_ID, build_vocab

SAMPLE_TEXT = "Hello world, describe the image 😀 漢字"
N_THREADS = 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoModelPaths:
    return make_demo_model(tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture(scope="module")
def model(demo: DemoModelPaths) -> Iterator[llama_cpp.llama_model_p]:
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    handle = llama_cpp.llama_model_load_from_file(str(demo.text).encode(), params)
    assert handle, "llama.cpp refused the text model"
    yield handle
    llama_cpp.llama_model_free(handle)


@pytest.fixture()
def ctx(model: llama_cpp.llama_model_p) -> Iterator[llama_cpp.llama_context_p]:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = 512
    params.n_batch = 512
    params.n_threads = N_THREADS
    params.n_threads_batch = N_THREADS
    handle = llama_cpp.llama_init_from_model(model, params)
    assert handle
    yield handle
    llama_cpp.llama_free(handle)


# --- generation --------------------------------------------------------------------------------


def test_files_are_small_and_deterministic(demo: DemoModelPaths, tmp_path: Path) -> None:
    assert demo.text.name == "demo-llava-text.gguf"
    assert demo.mmproj.name == "demo-llava-mmproj.gguf"
    for path in (demo.text, demo.mmproj):
        assert path.read_bytes()[:4] == b"GGUF"
        assert 10_000 < path.stat().st_size < 4_000_000
    # No temp files left next to the models.
    assert sorted(p.name for p in demo.text.parent.iterdir()) == [demo.mmproj.name, demo.text.name]

    again = make_demo_model(tmp_path / "again", seed=0)
    assert again.text.read_bytes() == demo.text.read_bytes()
    assert again.mmproj.read_bytes() == demo.mmproj.read_bytes()

    other = make_demo_model(tmp_path / "other", seed=1)
    assert other.text.read_bytes() != demo.text.read_bytes()
    assert other.mmproj.read_bytes() != demo.mmproj.read_bytes()


def test_unknown_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="huge"):
        make_demo_model(tmp_path, size="huge")  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_failed_write_leaves_previous_file_untouched(tmp_path: Path) -> None:
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")

    def explode(writer: object) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_gguf_atomically(target, "llama", explode)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


# --- text model --------------------------------------------------------------------------------


def _tokenize(vocab: llama_cpp.llama_vocab_p, text: str, add_special: bool) -> list[int]:
    raw = text.encode()
    buf = (llama_cpp.llama_token * (len(raw) + 8))()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(buf), add_special, False)
    assert n >= 0
    return list(buf[:n])


def _piece(vocab: llama_cpp.llama_vocab_p, token: int, lstrip: int = 0) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), lstrip, False)
    assert n >= 0
    return buf.raw[:n]


def test_vocab_tokenizes_words_and_falls_back_to_bytes(model: llama_cpp.llama_model_p) -> None:
    vocab = llama_cpp.llama_model_get_vocab(model)
    assert llama_cpp.llama_vocab_n_tokens(vocab) == len(build_vocab())
    assert 500 < len(build_vocab()) <= 2000
    assert llama_cpp.llama_vocab_bos(vocab) == BOS_ID
    assert llama_cpp.llama_vocab_eos(vocab) == EOS_ID
    assert llama_cpp.llama_vocab_is_eog(vocab, EOS_ID)
    assert llama_cpp.llama_vocab_get_add_bos(vocab)
    assert not llama_cpp.llama_vocab_get_add_eos(vocab)

    tokens = _tokenize(vocab, SAMPLE_TEXT, add_special=True)
    assert tokens[0] == BOS_ID and BOS_ID not in tokens[1:]
    assert 0 not in tokens  # never <unk>
    texts = [llama_cpp.llama_vocab_get_text(vocab, t).decode() for t in tokens]
    # Common words are single pieces; the emoji and the CJK characters are UTF-8 bytes.
    for word in ("▁Hello", "▁world", "▁describe", "▁the", "▁image"):
        assert word in texts
    assert [t for t in texts if t.startswith("<0x")] == [
        "<0xF0>", "<0x9F>", "<0x98>", "<0x80>",  # 😀
        "<0xE6>", "<0xBC>", "<0xA2>", "<0xE5>", "<0xAD>", "<0x97>",  # 漢字
    ]  # fmt: skip

    # Pieces of byte tokens are raw bytes, so join before decoding; lstrip drops the space that
    # SPM prefixes to the first word.
    body = tokens[1:]
    detok = _piece(vocab, body[0], lstrip=1) + b"".join(_piece(vocab, t) for t in body[1:])
    assert detok.decode("utf-8") == SAMPLE_TEXT


def test_chat_template_and_metadata(model: llama_cpp.llama_model_p) -> None:
    template = llama_cpp.llama_model_chat_template(model, None)
    assert template is not None and template.decode() == LLAVA_CHAT_TEMPLATE
    assert "<s>" not in LLAVA_CHAT_TEMPLATE  # mtmd adds BOS itself

    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, b"general.description", buf, len(buf))
    assert n > 0 and b"random" in buf.value
    n = llama_cpp.llama_model_meta_val_str(model, b"general.name", buf, len(buf))
    assert buf.value == CONFIGS["tiny"].name.encode()
    assert llama_cpp.llama_model_n_embd(model) == CONFIGS["tiny"].text.n_embd


# --- vision path -------------------------------------------------------------------------------


def _logits(ctx: llama_cpp.llama_context_p, n_vocab: int) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()


def test_image_prompt_evaluates_and_decodes(
    demo: DemoModelPaths, model: llama_cpp.llama_model_p, ctx: llama_cpp.llama_context_p
) -> None:
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = N_THREADS
    mctx = mtmd.mtmd_init_from_file(str(demo.mmproj).encode(), model, params)
    assert mctx, "mtmd refused the projector"
    bitmap = chunks = sampler = None
    try:
        assert mtmd.mtmd_support_vision(mctx)
        assert not mtmd.mtmd_support_audio(mctx)

        width, height = 200, 150
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        data = (ctypes.c_uint8 * pixels.size).from_buffer_copy(pixels.tobytes())
        bitmap = mtmd.mtmd_bitmap_init(width, height, data)
        assert bitmap

        marker = mtmd.mtmd_default_marker()
        prompt = b"USER: " + marker + b"\nWhat is in the image?\nASSISTANT:"
        text = mtmd.mtmd_input_text(
            text=prompt, text_len=len(prompt), add_special=True, parse_special=True
        )
        chunks = mtmd.mtmd_input_chunks_init()
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd.mtmd_tokenize(mctx, chunks, ctypes.byref(text), bitmaps, 1) == 0

        kinds = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            kinds.append(
                (mtmd.mtmd_input_chunk_get_type(chunk), mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            )
        vision = CONFIGS["tiny"].vision
        # Fixed-size LLaVA preprocessing: any image becomes (112/14)^2 = 64 embeddings.
        assert kinds[1] == (mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE, vision.n_patches)
        assert [k for k, _ in kinds] == [
            mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT,
            mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE,
            mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT,
        ]
        n_prompt = mtmd.mtmd_helper_get_n_tokens(chunks)

        n_past = llama_cpp.llama_pos(0)
        rc = mtmd.mtmd_helper_eval_chunks(mctx, ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past))
        assert rc == 0
        assert n_past.value == n_prompt

        vocab = llama_cpp.llama_model_get_vocab(model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())

        generated: list[int] = []
        for _ in range(8):
            logits = _logits(ctx, n_vocab)
            assert np.isfinite(logits).all()
            assert logits.std() > 0.1  # not a flat distribution
            token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
            assert token == int(np.argmax(logits))
            generated.append(token)
            one = (llama_cpp.llama_token * 1)(token)
            assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
        assert all(0 <= t < n_vocab for t in generated)
        assert len(set(generated)) > 1  # greedy is not stuck on a single token
    finally:
        if sampler is not None:
            llama_cpp.llama_sampler_free(sampler)
        if chunks is not None:
            mtmd.mtmd_input_chunks_free(chunks)
        if bitmap is not None:
            mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(mctx)
