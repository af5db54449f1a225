"""The Youtu-VL-style demo model loads and runs in the real llama.cpp: deepseek2 (MLA) text with
a byte-level BPE "youtu" vocab, and the youtuvl projector through mtmd."""

from __future__ import annotations

import ctypes
import random
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np
import pytest

from server.demo_model import YOUTU_VL_CHAT_TEMPLATE, DemoModelPaths, make_demo_model
from server.demo_model.bpe_vocab import BOS, EOS, VISION_END, VISION_START, build_bpe_vocab
from server.demo_model.youtu_config import YOUTU_CONFIGS
from server.engine.projector import read_projector_info
from server.engine.prompt import ChatTemplate
from server.engine.types import ChatMessage, ImageInput
from server.images import SizeRule

N_THREADS = 2
MARKER = mtmd.mtmd_default_marker().decode()


@pytest.fixture(scope="module")
def youtu(tmp_path_factory: pytest.TempPathFactory) -> DemoModelPaths:
    return make_demo_model(tmp_path_factory.mktemp("youtu"), seed=0, family="youtu-vl")


@pytest.fixture(scope="module")
def model(youtu: DemoModelPaths) -> Iterator[llama_cpp.llama_model_p]:
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    handle = llama_cpp.llama_model_load_from_file(str(youtu.text).encode(), params)
    assert handle, "llama.cpp refused the deepseek2 text model"
    yield handle
    llama_cpp.llama_model_free(handle)


@pytest.fixture(scope="module")
def vocab(model: llama_cpp.llama_model_p) -> llama_cpp.llama_vocab_p:
    return llama_cpp.llama_model_get_vocab(model)


def open_mtmd(youtu: DemoModelPaths, model: llama_cpp.llama_model_p,
              max_tokens: int = -1) -> mtmd.mtmd_context_p:
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = N_THREADS
    params.print_timings = False
    params.warmup = False
    params.image_max_tokens = max_tokens
    mctx = mtmd.mtmd_init_from_file(str(youtu.mmproj).encode(), model, params)
    assert mctx, "mtmd refused the youtuvl projector"
    return mctx


@pytest.fixture(scope="module")
def mctx(youtu: DemoModelPaths, model: llama_cpp.llama_model_p) -> Iterator[int]:
    handle = open_mtmd(youtu, model)
    yield handle
    mtmd.mtmd_free(handle)


def tokenize(vocab: llama_cpp.llama_vocab_p, text: str, *, parse_special: bool) -> list[int]:
    raw = text.encode()
    buf = (llama_cpp.llama_token * (len(raw) + 8))()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, parse_special)
    assert n >= 0
    return list(buf[:n])


def piece(vocab: llama_cpp.llama_vocab_p, token: int) -> bytes:
    buf = ctypes.create_string_buffer(128)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    assert n >= 0
    return buf.raw[:n]


def meta(model: llama_cpp.llama_model_p, key: str) -> str:
    buf = ctypes.create_string_buffer(1 << 16)
    assert llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf)) >= 0, key
    return buf.value.decode()


class Chunks:
    """An mtmd tokenization of `prompt` (with mtmd's marker) and random-pixel images."""

    def __init__(self, mctx: int, prompt: str, sizes: list[tuple[int, int]]) -> None:
        rng = np.random.default_rng(0)
        self.bitmaps = []
        for width, height in sizes:
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8).tobytes()
            data = (ctypes.c_uint8 * len(pixels)).from_buffer_copy(pixels)
            self.bitmaps.append(mtmd.mtmd_bitmap_init(width, height, data))
        raw = prompt.encode()
        text = mtmd.mtmd_input_text(raw, len(raw), True, True)
        self.handle = mtmd.mtmd_input_chunks_init()
        array = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(sizes)))(*self.bitmaps)
        assert mtmd.mtmd_tokenize(mctx, self.handle, ctypes.byref(text), array, len(sizes)) == 0

    def __enter__(self) -> Chunks:
        return self

    def __exit__(self, *_: object) -> None:
        mtmd.mtmd_input_chunks_free(self.handle)
        for bitmap in self.bitmaps:
            mtmd.mtmd_bitmap_free(bitmap)

    def chunks(self) -> list[int]:
        return [mtmd.mtmd_input_chunks_get(self.handle, i)
                for i in range(mtmd.mtmd_input_chunks_size(self.handle))]

    def text_tokens(self, chunk: int) -> list[int]:
        n = ctypes.c_size_t(0)
        ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
        return list(ptr[: n.value])

    def image_tokens(self) -> list[int]:
        return [mtmd.mtmd_input_chunk_get_n_tokens(c) for c in self.chunks()
                if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]


def image_tokens(mctx: int, width: int, height: int) -> int:
    with Chunks(mctx, f"look {MARKER} now", [(width, height)]) as chunks:
        (n,) = chunks.image_tokens()
        return n


# --- generation --------------------------------------------------------------------------------


def test_files_are_small_deterministic_and_named_by_family(youtu: DemoModelPaths,
                                                           tmp_path: Path) -> None:
    assert (youtu.text.name, youtu.mmproj.name) == (
        "demo-youtu-vl-text.gguf", "demo-youtu-vl-mmproj.gguf")
    for path in (youtu.text, youtu.mmproj):
        assert path.read_bytes()[:4] == b"GGUF"
        assert 10_000 < path.stat().st_size < 4_000_000
    again = make_demo_model(tmp_path / "again", seed=0, family="youtu-vl")
    assert again.text.read_bytes() == youtu.text.read_bytes()
    assert again.mmproj.read_bytes() == youtu.mmproj.read_bytes()
    other = make_demo_model(tmp_path / "other", seed=1, family="youtu-vl")
    assert other.text.read_bytes() != youtu.text.read_bytes()
    assert other.mmproj.read_bytes() != youtu.mmproj.read_bytes()


def test_unknown_family_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qwen"):
        make_demo_model(tmp_path, family="qwen")  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


# --- text model --------------------------------------------------------------------------------


def test_deepseek2_mla_metadata(model: llama_cpp.llama_model_p) -> None:
    cfg = YOUTU_CONFIGS["tiny"].text
    assert meta(model, "general.architecture") == "deepseek2"
    assert int(meta(model, "deepseek2.attention.kv_lora_rank")) == cfg.kv_lora_rank
    assert int(meta(model, "deepseek2.attention.key_length_mla")) == cfg.qk_head_dim
    assert int(meta(model, "deepseek2.leading_dense_block_count")) == cfg.n_layer
    assert llama_cpp.llama_model_n_embd(model) == cfg.n_embd
    # Plain (not multi-section) RoPE: positions are one per token, images included.
    assert llama_cpp.llama_model_rope_type(model) == llama_cpp.LLAMA_ROPE_TYPE_NORM
    assert llama_cpp.llama_model_chat_template(model, None).decode() == YOUTU_VL_CHAT_TEMPLATE


def test_bpe_vocab_tokenizes_any_text(model: llama_cpp.llama_model_p,
                                      vocab: llama_cpp.llama_vocab_p) -> None:
    bpe = build_bpe_vocab()
    assert meta(model, "tokenizer.ggml.model") == "gpt2"
    assert meta(model, "tokenizer.ggml.pre") == "youtu"
    assert llama_cpp.llama_vocab_n_tokens(vocab) == len(bpe) < 4000
    assert llama_cpp.llama_vocab_bos(vocab) == bpe.id_of(BOS)
    assert llama_cpp.llama_vocab_eos(vocab) == bpe.id_of(EOS)
    assert llama_cpp.llama_vocab_is_eog(vocab, bpe.id_of(EOS))
    assert not llama_cpp.llama_vocab_get_add_bos(vocab)  # the template writes every BOS

    sample = "Hello world, describe the image 😀 漢字\n\n\ttabs  and 12345 cats'"
    tokens = tokenize(vocab, sample, parse_special=False)
    pieces = [piece(vocab, t) for t in tokens]
    assert b"".join(pieces).decode() == sample
    for word in (b" world", b" describe", b" the", b" image", b"\n\n"):
        assert word in pieces  # common words are one token; the rest falls back to bytes
    rng = random.Random(3)
    for _ in range(20):  # any UTF-8 text round-trips through byte-level tokens
        text = "".join(chr(rng.choice([rng.randint(1, 0x7F), rng.randint(0x80, 0xD7FF),
                                       rng.randint(0xE000, 0x10FFFF)])) for _ in range(40))
        ids = tokenize(vocab, text, parse_special=False)
        assert b"".join(piece(vocab, t) for t in ids).decode() == text


def test_special_tokens_parse_as_one_token(vocab: llama_cpp.llama_vocab_p) -> None:
    bpe = build_bpe_vocab()
    for special in (BOS, EOS, VISION_START, VISION_END):
        assert tokenize(vocab, special, parse_special=True) == [bpe.id_of(special)]


# --- vision path -------------------------------------------------------------------------------


def test_youtuvl_decodes_causally_with_one_position_per_token(mctx: int) -> None:
    assert not mtmd.mtmd_decode_use_mrope(mctx)
    assert not mtmd.mtmd_decode_use_non_causal(mctx, None)
    with Chunks(mctx, f"a {MARKER} b", [(96, 64)]) as chunks:
        image = chunks.chunks()[1]
        assert mtmd.mtmd_input_chunk_get_n_pos(image) == mtmd.mtmd_input_chunk_get_n_tokens(image)


def test_images_are_wrapped_in_vision_tokens(mctx: int, vocab: llama_cpp.llama_vocab_p) -> None:
    bpe = build_bpe_vocab()
    with Chunks(mctx, f"a {MARKER}b", [(64, 64)]) as chunks:
        before, image, after = chunks.chunks()
        assert mtmd.mtmd_input_chunk_get_type(image) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE
        assert chunks.text_tokens(before)[-1] == bpe.id_of(VISION_START)
        assert chunks.text_tokens(after)[0] == bpe.id_of(VISION_END)


@pytest.mark.parametrize("width, height", [
    (448, 448), (640, 360), (360, 640), (1024, 256), (200, 150), (33, 31), (10, 10),
    (2048, 512), (3000, 200),
])
def test_mtmd_token_counts_match_the_size_rule(mctx: int, youtu: DemoModelPaths,
                                               width: int, height: int) -> None:
    geometry = read_projector_info(youtu.mmproj).geometry(1024)
    rule = SizeRule(geometry.max_side, geometry.cell, geometry.max_cells)
    cols, rows = rule.grid(width, height)
    # mtmd keeps an image already on the grid as it is: the same token count, no resize.
    assert image_tokens(mctx, *rule.box(width, height)) == cols * rows
    if max(width, height) <= geometry.max_side:  # and the raw image gives the same
        assert image_tokens(mctx, width, height) == cols * rows


def test_token_budget_matches_mtmd(youtu: DemoModelPaths, model: llama_cpp.llama_model_p) -> None:
    budget = 100
    limited = open_mtmd(youtu, model, max_tokens=budget)
    try:
        geometry = read_projector_info(youtu.mmproj).geometry(1024, budget)
        rule = SizeRule(geometry.max_side, geometry.cell, geometry.max_cells)
        for size in ((1024, 1024), (1024, 256), (300, 900), (640, 360)):
            cols, rows = rule.grid(*size)
            assert cols * rows <= budget
            assert image_tokens(limited, *rule.box(*size)) == cols * rows
            # mtmd alone shrinks in 2 % steps: never more tokens than the rule's exact fit.
            assert image_tokens(limited, *size) <= cols * rows
    finally:
        mtmd.mtmd_free(limited)


def test_rendered_prompt_keeps_its_single_leading_bos(mctx: int,
                                                      vocab: llama_cpp.llama_vocab_p) -> None:
    """The vocab adds no BOS, so the renderer must keep the template's first <|begin_of_text|>:
    each turn then starts with exactly one."""
    bpe = build_bpe_vocab()
    template = ChatTemplate(YOUTU_VL_CHAT_TEMPLATE, bos_token=BOS, eos_token=EOS,
                            media_marker=MARKER, strip_bos=False, part_separator="")
    image = ImageInput(b"\0" * 64 * 64 * 3, 64, 64, "h")
    rendered = template.render([ChatMessage("user", (image, "What is it?"))])
    assert rendered.text.startswith(BOS + "system\n")
    with Chunks(mctx, rendered.text, [(64, 64)]) as chunks:
        first, _, last = chunks.chunks()
        tokens = chunks.text_tokens(first) + chunks.text_tokens(last)
    assert tokens[0] == bpe.id_of(BOS) and tokens[1] != bpe.id_of(BOS)
    assert tokens.count(bpe.id_of(BOS)) == 3  # system, user, and the assistant's turn


def test_image_prompt_evaluates_and_generates(youtu: DemoModelPaths, model: llama_cpp.llama_model_p,
                                              mctx: int, vocab: llama_cpp.llama_vocab_p) -> None:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = 512
    params.n_batch = 512
    params.n_threads = params.n_threads_batch = N_THREADS
    ctx = llama_cpp.llama_init_from_model(model, params)
    assert ctx
    sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())
    prompt = f"{BOS}user\n{MARKER}What is in the image?{EOS}\n{BOS}assistant\n"
    try:
        with Chunks(mctx, prompt, [(200, 150)]) as chunks:
            assert chunks.image_tokens() == [7 * 5]  # 224 x 160 px: 7 x 5 cells of 32 px
            n_past = llama_cpp.llama_pos(0)
            assert mtmd.mtmd_helper_eval_chunks(mctx, ctx, chunks.handle, 0, 0, 512, True,
                                                ctypes.byref(n_past)) == 0
            assert n_past.value == mtmd.mtmd_helper_get_n_tokens(chunks.handle)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        generated = []
        for _ in range(8):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1),
                                           shape=(n_vocab,))
            assert np.isfinite(logits).all() and logits.std() > 0.1
            token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
            generated.append(token)
            one = (llama_cpp.llama_token * 1)(token)
            assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
        assert len(set(generated)) > 1  # greedy is not stuck on a single token
    finally:
        llama_cpp.llama_sampler_free(sampler)
        llama_cpp.llama_free(ctx)
