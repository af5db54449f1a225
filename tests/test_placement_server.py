"""Placement read back from llama.cpp, end to end: a real server on this CPU build, asked for
GPU layers, must say CPU for both parts (matching llama.cpp's own load log), warn with the
fix, and show the same in /models meta and /metrics."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server
from prometheus_client.parser import text_string_to_metric_families

from server.demo_model import DemoModelPaths


@pytest.fixture(scope="module")
def gpu_asking_server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[RunningServer]:
    """Debug log level, so llama.cpp's own load lines are in the log to compare with."""
    log_path = tmp_path_factory.mktemp("placement") / "server.log"
    running = start_server(demo_model, log_path, "--n-gpu-layers", "-1",
                           "--log-level", "debug", "--n-parallel", "1")
    yield running
    stop_server(running)


def llama_lines(log: str, pattern: str) -> list[re.Match[str]]:
    """llama.cpp's lines as vlserve.llama logged them."""
    return [m for line in log.splitlines() if " vlserve.llama: " in line
            and (m := re.search(pattern, line.split(" vlserve.llama: ", 1)[1]))]


def test_meta_placement_matches_the_load_log(gpu_asking_server: RunningServer) -> None:
    meta = httpx.get(f"{gpu_asking_server.api}/models", timeout=10).json()["data"][0]["meta"]
    placement = meta["placement"]
    log = gpu_asking_server.log()
    # llama.cpp's own words: every layer (and the output layer) on the CPU, CLIP on the CPU,
    # and no "offloaded N/M layers" line at all in a build without a GPU backend.
    layers = llama_lines(log, r"^load_tensors: layer\s+(\d+) assigned to device (\S+),")
    assert layers and {m[2] for m in layers} == {"CPU"}
    assert [m[1] for m in llama_lines(log, r"^clip_ctx: CLIP using (\S+) backend$")] == ["CPU"]
    assert not llama_lines(log, r"offloaded \d+/\d+ layers to GPU")
    buffers = {m[1]: float(m[2]) for m in
               llama_lines(log, r"^load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB")}
    kv = llama_lines(log, r"K \((\w+)\):.*V \((\w+)\):")

    assert placement["llm_device"] == "CPU" and placement["projector_device"] == "CPU"
    assert placement["gpu_layers"] == meta["gpu_layers"] == 0
    assert placement["offloadable_layers"] == len(layers) == meta["n_layers"] + 1
    assert placement["weights_mib"] == buffers
    assert (placement["kv_type_k"], placement["kv_type_v"]) == (kv[0][1], kv[0][2])
    assert meta["projector_on_gpu"] is False and meta["gpu_build"] is False
    assert meta["backends"] == ["CPU"] and meta["llama_cpp_python"] == "0.3.36"


def test_gpu_layers_on_a_cpu_build_warn_with_the_fix(gpu_asking_server: RunningServer) -> None:
    meta = httpx.get(f"{gpu_asking_server.api}/models", timeout=10).json()["data"][0]["meta"]
    (warning,) = meta["placement_warnings"]
    assert "n_gpu_layers is -1 but this llama.cpp build has no GPU backend" in warning
    assert 'CMAKE_ARGS="-DGGML_CUDA=on"' in warning
    warned = [line for line in gpu_asking_server.log().splitlines()
              if " WARNING vlserve.engine: " in line and "n_gpu_layers is -1" in line]
    assert len(warned) == 1 and 'CMAKE_ARGS="-DGGML_CUDA=on"' in warned[0]


def test_startup_and_ready_lines_say_where_it_runs(gpu_asking_server: RunningServer) -> None:
    log = gpu_asking_server.log()
    assert ("LLM layers run on CPU; vision encoder runs on CPU; flash attention "
            in log)
    ready = [line for line in log.splitlines() if " vlserve: ready: " in line]
    assert len(ready) == 1
    assert f"ready: {gpu_asking_server.url}/ (playground) serving vlserve-demo-llava from " \
        in ready[0]
    assert Path(gpu_asking_server.models.text).name in ready[0]
    assert "LLM layers run on CPU; vision encoder runs on CPU" in ready[0]


def test_metrics_show_build_and_placement(gpu_asking_server: RunningServer) -> None:
    text = httpx.get(f"{gpu_asking_server.url}/metrics", timeout=10).text
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    build = samples["vlserve_build_info"].labels
    assert build["llama_cpp_python"] == "0.3.36" and build["backends"] == "CPU"
    assert build["model"] == "vlserve-demo-llava"
    placement = samples["vlserve_placement_info"]
    assert placement.value == 1
    assert placement.labels["llm_device"] == "CPU"
    assert placement.labels["projector_device"] == "CPU"
    assert placement.labels["kv_type_k"] == "f16"
    assert samples["vlserve_gpu_layers"].value == 0
