"""A model this llama.cpp cannot load is refused from its GGUF headers before the server
starts: one line naming the kind and what to serve instead, exit 2, HTTP never up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from gguf import GGUFWriter

from bench.servers import free_port
from server.demo_model import DemoModelPaths
from server.demo_model.gguf_file import write_gguf_atomically

EXIT_CONFIG = 2


def header_only(path: Path, arch: str, **strings: str) -> Path:
    """A GGUF with keys and no tensors: all the check reads (llama.cpp is never reached)."""
    def fill(writer: GGUFWriter) -> None:
        for key, value in strings.items():
            writer.add_string(key.replace("__", "."), value)
        if arch == "clip":
            writer.add_bool("clip.has_vision_encoder", True)

    write_gguf_atomically(path, arch, fill)
    return path


def serve(model: Path, mmproj: Path | None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model),
           "--port", str(free_port())] + (["--mmproj", str(mmproj)] if mmproj else [])
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLSERVE_")}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def assert_refused(result: subprocess.CompletedProcess[str]) -> str:
    """Exit 2, nothing on stdout, one stderr line (the ConfigError) and no traceback."""
    assert result.returncode == EXIT_CONFIG, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("vlserve: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    # The HTTP server never came up: its "listening" line is logged before uvicorn starts.
    assert "listening on" not in result.stderr + result.stdout
    return errors[0]


def test_llama_3_2_vision_is_refused_with_what_to_use_instead(tmp_path: Path) -> None:
    model = header_only(tmp_path / "Llama-3.2-11B-Vision-Instruct.Q4_K_M.gguf", "mllama")
    mmproj = header_only(tmp_path / "mmproj-mllama.gguf", "clip", clip__projector_type="mllama")
    line = assert_refused(serve(model, mmproj))
    assert line == (
        "vlserve: cannot serve this model: text model architecture 'mllama' is not one "
        "llama.cpp in llama-cpp-python 0.3.36 can load; projector type 'mllama' in "
        "mmproj-mllama.gguf is not supported by llama.cpp in llama-cpp-python 0.3.36 (known "
        "types: server/engine/supported.py); Llama-3.2-Vision (mllama) is not in llama.cpp; "
        "serve Llama 4 Scout (projector llama4) or a registry family instead (glm-4.6v-flash, "
        "youtu-vl-4b-instruct, llava-1.5-7b: `vlserve models`)")


def test_unknown_projector_beside_a_supported_text_model(demo_model: DemoModelPaths,
                                                         tmp_path: Path) -> None:
    mmproj = header_only(tmp_path / "mmproj-future.gguf", "clip", clip__projector_type="zzz")
    line = assert_refused(serve(demo_model.text, mmproj))
    assert "architecture" not in line  # the llama text model is fine: only the projector
    assert line.startswith("vlserve: cannot serve this model: projector type 'zzz' in "
                           "mmproj-future.gguf is not supported")
    assert line.endswith("serve a supported family instead (`vlserve models` lists the "
                         "registry's, with their status)")


def test_a_projector_without_a_vision_encoder(demo_model: DemoModelPaths, tmp_path: Path
                                              ) -> None:
    """An audio-only mmproj (no clip.has_vision_encoder) cannot serve images."""
    def fill(writer: GGUFWriter) -> None:
        writer.add_string("clip.projector_type", "ultravox")
        writer.add_bool("clip.has_audio_encoder", True)

    mmproj = tmp_path / "mmproj-audio.gguf"
    write_gguf_atomically(mmproj, "clip", fill)
    line = assert_refused(serve(demo_model.text, mmproj))
    assert line.startswith(f"vlserve: cannot serve this model: {mmproj} has no vision encoder")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"<html>404 Not Found</html>")  # what a bad download URL leaves
    line = assert_refused(serve(model, None))
    assert line == f"vlserve: cannot read the model's GGUF header: {model}: not a GGUF file"


def test_a_load_that_fails_after_the_model_frees_it(demo_model: DemoModelPaths,
                                                    tmp_path: Path) -> None:
    """A template that does not compile fails the load after llama.cpp mapped the model and
    made its context (and mtmd its projector): none of them may stay behind (a supervisor
    restarting a bad config, `vlserve doctor` probing, would pile them up)."""
    import pytest

    from server.config import load_settings
    from server.engine.model import load_model
    from server.engine.prompt import PromptError

    model = tmp_path / "copy.gguf"
    mmproj = tmp_path / "copy-mmproj.gguf"
    model.write_bytes(demo_model.text.read_bytes())
    mmproj.write_bytes(demo_model.mmproj.read_bytes())
    settings = load_settings(None, model=model, mmproj=mmproj, n_ctx=256, n_parallel=1,
                             n_threads=1, chat_template="{% if %}")
    with pytest.raises(PromptError, match="does not compile"):
        load_model(settings)
    # llama.cpp maps the GGUF while the model lives (mtmd reads its file instead: freeing
    # it is exercised here, not observable this way).
    assert str(model) not in Path("/proc/self/maps").read_text()
