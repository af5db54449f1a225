"""The generic image sizing on a projector type no vlserve code names: a Qwen2-VL-style demo
pair (qwen2vl text + qwen2vl_merger mmproj). mtmd's grid equals the API's box, and the
real server's image token counts follow the image's size and aspect ratio."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import data_url, expected_image_tokens, image_message, pattern_png
from test_demo_model_glm4v import grid

from server.demo_model import DemoModelPaths, make_demo_model
from server.engine.projector import read_projector_info
from server.images import SizeRule

CELL = 28


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> DemoModelPaths:
    return make_demo_model(tmp_path_factory.mktemp("qwen2vl"), family="qwen2vl")


@pytest.fixture(scope="module")
def mctx(qwen: DemoModelPaths) -> Iterator[int]:
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(qwen.text).encode(), params)
    assert model, "llama.cpp refused the qwen2vl text model"
    mparams = mtmd.mtmd_context_params_default()
    mparams.use_gpu, mparams.n_threads, mparams.print_timings = False, 1, False
    mparams.warmup = False
    handle = mtmd.mtmd_init_from_file(str(qwen.mmproj).encode(), model, mparams)
    assert handle, "mtmd refused the qwen2vl_merger projector"
    yield handle
    mtmd.mtmd_free(handle)
    llama_cpp.llama_model_free(model)


def test_the_header_and_the_type_table_give_qwens_rule(qwen: DemoModelPaths) -> None:
    info = read_projector_info(qwen.mmproj)
    assert (info.projector_type, info.kind, info.cell) == ("qwen2vl_merger", "dynamic", CELL)
    assert info.pixel_limits() == (8 * CELL * CELL, 4096 * CELL * CELL)  # clip.cpp's 8..4096
    assert info.wraps_images


@pytest.mark.parametrize("width, height", [(448, 448), (640, 360), (290, 620), (2000, 500),
                                           (12, 12)])
def test_mtmd_resizes_to_the_api_box(mctx: int, qwen: DemoModelPaths, width: int,
                                     height: int) -> None:
    geometry = read_projector_info(qwen.mmproj).geometry(8192)
    rule = SizeRule(geometry.max_side, geometry.cell, None, geometry.min_pixels,
                    geometry.max_pixels)
    box = rule.box(width, height)
    cells = (box[0] // CELL, box[1] // CELL)
    assert grid(mctx, width, height) == cells  # what mtmd does with the original...
    assert grid(mctx, *box) == cells  # ...and with the API's box: the same, so it copies


@pytest.fixture(scope="module")
def qwen_server(qwen: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[RunningServer]:
    log_path = tmp_path_factory.mktemp("qwen2vl-server") / "server.log"
    running = start_server(qwen, log_path, family="qwen2vl")
    yield running
    stop_server(running)


@pytest.mark.parametrize("width, height", [(448, 448), (640, 360), (360, 640), (2048, 512)])
def test_served_token_counts_follow_the_image(qwen_server: RunningServer, width: int,
                                              height: int) -> None:
    reply = httpx.post(f"{qwen_server.api}/chat/completions", timeout=60, json={
        "model": qwen_server.model_name, "max_tokens": 2, "temperature": 0,
        "messages": [image_message("What shape is this?",
                                   data_url(pattern_png(width, height, seed=width)))]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["timings"]["image_tokens"] == expected_image_tokens("qwen2vl", width, height)
    meta = httpx.get(f"{qwen_server.api}/models", timeout=10).json()["data"][0]["meta"]
    assert (meta["projector_type"], meta["image_sizing"], meta["image_cell"]) == (
        "qwen2vl_merger", "dynamic", CELL)
    assert meta["uses_mrope"] is True
