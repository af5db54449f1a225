"""The GLM-4V-style demo model loads and runs in the real llama.cpp: glm4 text (M-RoPE) with a
byte-level BPE "glm4" vocab, and the glm4v projector through mtmd, whose image grid is the one
the API decodes to (so mtmd only copies the pixels)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np
import pytest
from test_demo_model_youtu import Chunks, meta, piece, tokenize

from server.demo_model import DemoModelPaths, make_demo_model
from server.demo_model.glm_config import GLM_CONFIGS
from server.demo_model.glm_text_model import SPECIAL_TOKENS
from server.engine.projector import read_projector_info
from server.engine.templates import TEMPLATES
from server.images import SizeRule

MARKER = mtmd.mtmd_default_marker().decode()
CELL = 28  # 14 px patches merged 2x2


@pytest.fixture(scope="module")
def glm(glm4v_model: DemoModelPaths) -> DemoModelPaths:
    return glm4v_model


@pytest.fixture(scope="module")
def model(glm: DemoModelPaths) -> Iterator[llama_cpp.llama_model_p]:
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    handle = llama_cpp.llama_model_load_from_file(str(glm.text).encode(), params)
    assert handle, "llama.cpp refused the glm4 text model"
    yield handle
    llama_cpp.llama_model_free(handle)


def open_mtmd(glm: DemoModelPaths, model: llama_cpp.llama_model_p, max_tokens: int = -1) -> int:
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 1, False, False
    params.image_max_tokens = max_tokens
    mctx = mtmd.mtmd_init_from_file(str(glm.mmproj).encode(), model, params)
    assert mctx, "mtmd refused the glm4v projector"
    return mctx


@pytest.fixture(scope="module")
def mctx(glm: DemoModelPaths, model: llama_cpp.llama_model_p) -> Iterator[int]:
    handle = open_mtmd(glm, model)
    yield handle
    mtmd.mtmd_free(handle)


def grid(mctx: int, width: int, height: int) -> tuple[int, int]:
    """(columns, rows) of image tokens mtmd makes of a width x height image."""
    with Chunks(mctx, f"look {MARKER} now", [(width, height)]) as chunks:
        (image,) = [c for c in chunks.chunks()
                    if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]
        tokens = mtmd.mtmd_input_chunk_get_tokens_image(image)
        return mtmd.mtmd_image_tokens_get_nx(tokens), mtmd.mtmd_image_tokens_get_ny(tokens)


def test_files_are_small_deterministic_and_named_by_family(glm: DemoModelPaths,
                                                           tmp_path: Path) -> None:
    assert (glm.text.name, glm.mmproj.name) == ("demo-glm4v-text.gguf",
                                                "demo-glm4v-mmproj.gguf")
    for path in (glm.text, glm.mmproj):
        assert 10_000 < path.stat().st_size < 4_000_000
    again = make_demo_model(tmp_path, seed=0, family="glm4v")
    assert again.text.read_bytes() == glm.text.read_bytes()
    assert again.mmproj.read_bytes() == glm.mmproj.read_bytes()


def test_text_model_is_glm4_with_mrope_and_glm_special_tokens(model: llama_cpp.llama_model_p
                                                              ) -> None:
    assert meta(model, "general.architecture") == "glm4"
    assert meta(model, "glm4.rope.dimension_count") == "8"  # half of the 16-wide heads
    assert llama_cpp.llama_model_rope_type(model) == llama_cpp.LLAMA_ROPE_TYPE_MROPE
    vocab = llama_cpp.llama_model_get_vocab(model)
    for special in SPECIAL_TOKENS:
        (token,) = tokenize(vocab, special, parse_special=True)
        assert piece(vocab, token) == special.encode()
    # No BOS (the template writes [gMASK]<sop>); <|user|> ends the answer.
    assert not llama_cpp.llama_vocab_get_add_bos(vocab)
    (user,) = tokenize(vocab, "<|user|>", parse_special=True)
    assert llama_cpp.llama_vocab_is_eog(vocab, user)
    assert meta(model, "tokenizer.chat_template") == TEMPLATES["glm-4"].source


def test_mtmd_wraps_images_in_glm_markers_with_mrope(mctx: int, model: llama_cpp.llama_model_p
                                                     ) -> None:
    vocab = llama_cpp.llama_model_get_vocab(model)
    assert mtmd.mtmd_decode_use_mrope(mctx)
    with Chunks(mctx, f"look {MARKER} now", [(280, 140)]) as chunks:
        before, _, after = chunks.chunks()
        assert piece(vocab, chunks.text_tokens(before)[-1]) == b"<|begin_of_image|>"
        assert piece(vocab, chunks.text_tokens(after)[0]) == b"<|end_of_image|>"
        assert chunks.image_tokens() == [10 * 5]


@pytest.mark.parametrize("width, height", [
    (448, 448), (640, 360), (360, 640), (1024, 256), (1000, 700), (10, 10), (3000, 40),
    (333, 777), (290, 620), (620, 290), (1, 300),
])
def test_the_api_box_is_what_mtmd_resizes_to(mctx: int, glm: DemoModelPaths,
                                            width: int, height: int) -> None:
    """mtmd's grid for the original equals the API's box in cells, and the box, given to
    mtmd, keeps that grid (mtmd copies it: no second resize). The side cap is the 8192 px
    limit of image_max_pixels here, so the projector's own limits decide."""
    info = read_projector_info(glm.mmproj)
    assert (info.kind, info.cell) == ("dynamic", CELL)
    rule = SizeRule.from_info({"image_target_side": 8192 // CELL * CELL, "image_cell": CELL,
                               "projector_min_pixels": 8 * CELL * CELL,
                               "projector_max_pixels": 4096 * CELL * CELL}, 8192)
    assert rule == SizeRule(8176, CELL, None, *info.pixel_limits())
    box = rule.box(width, height)
    cells = (box[0] // CELL, box[1] // CELL)
    if max(width, height) < 50 * min(width, height):  # extreme ratios: see test_geometry
        assert grid(mctx, width, height) == cells
    assert grid(mctx, *box) == cells


def test_image_max_tokens_reaches_mtmd_and_the_box_alike(glm: DemoModelPaths,
                                                         model: llama_cpp.llama_model_p) -> None:
    handle = open_mtmd(glm, model, max_tokens=64)
    try:
        geometry = read_projector_info(glm.mmproj).geometry(1024, 64)
        rule = SizeRule(geometry.max_side, geometry.cell, None, geometry.min_pixels,
                        geometry.max_pixels)
        for size in ((640, 480), (1024, 256), (300, 300)):
            box = rule.box(*size)
            assert (box[0] // CELL) * (box[1] // CELL) <= 64
            assert grid(handle, *size) == (box[0] // CELL, box[1] // CELL)
    finally:
        mtmd.mtmd_free(handle)


def test_the_bench_size_keeps_the_geometry() -> None:
    tiny, bench = GLM_CONFIGS["tiny"], GLM_CONFIGS["bench"]
    assert (tiny.vision.patch_size, tiny.vision.spatial_merge) == (14, 2)
    assert (bench.vision.patch_size, bench.vision.spatial_merge) == (14, 2)
    assert sum(tiny.rope_sections) == tiny.rope_dims // 2
    assert np.all(np.array(bench.rope_sections[:3]) > 0)
