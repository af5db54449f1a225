"""`vlserve models`: per registry entry, the family, the GGUF kinds and whether this build of
llama.cpp loads them (from the registry before a download, from the files' headers after)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

from server.demo_model import DemoModelPaths


def write_registry(path: Path, *, arch: str | None, projector: str | None,
                   names: tuple[str, str] = ("model.gguf", "mmproj.gguf")) -> Path:
    kinds = "".join(f"    {key}: {value}\n" for key, value in
                    (("text_architecture", arch), ("projector_type", projector)) if value)
    path.write_text(f"""models:
  some-vl:
    title: Some VL
    repo: someone/some-vl
    dir: some-vl
    family: Some-VL
{kinds}    files:
      model: {{name: {names[0]}, quant: Q4_K_M}}
      mmproj: {{name: {names[1]}, quant: F16}}
""")
    return path


def models(registry: Path, models_dir: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VLSERVE_"))}
    result = subprocess.run([sys.executable, "-m", "server.cli", "models", "--registry",
                             str(registry), "--dir", str(models_dir)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_shipped_registry_names_every_family_and_its_support(tmp_path: Path) -> None:
    out = models(ROOT / "models" / "registry.yaml", tmp_path)
    for name, line in (
        ("youtu-vl-4b-instruct", "family Youtu-VL; deepseek2 + youtuvl: supported"),
        ("llava-1.5-7b", "family LLaVA-1.5; llama + mlp: supported"),
        ("glm-4.6v-flash", "family GLM-4V; glm4 + glm4v: supported"),
        ("gemma3-270m", "family Gemma 3 (text only); gemma3: supported"),
    ):
        block = out[out.index(f"{name}  [not downloaded]"):]
        assert block.splitlines()[1] == (f"    {line} by llama.cpp in llama-cpp-python "
                                         "0.3.36"), name


def test_an_unsupported_entry_says_so_before_any_download(tmp_path: Path) -> None:
    out = models(write_registry(tmp_path / "r.yaml", arch="mllama", projector="mllama"),
                 tmp_path / "models")
    line = out.splitlines()[1]
    assert line.startswith("    family Some-VL; mllama + mllama: NOT supported: text model "
                           "architecture 'mllama' is not one llama.cpp in llama-cpp-python "
                           "0.3.36 can load; projector type 'mllama'")
    assert line.endswith("Llama-3.2-Vision (mllama) is not in llama.cpp; serve Llama 4 Scout "
                         "(projector llama4) or a registry family instead (glm-4.6v-flash, "
                         "youtu-vl-4b-instruct, llava-1.5-7b: `vlserve models`)")
    unknown = models(write_registry(tmp_path / "u.yaml", arch=None, projector=None),
                     tmp_path / "models")
    assert unknown.splitlines()[1] == ("    family Some-VL; ? + ?: unknown (not in the "
                                       "registry; download it and run `vlserve doctor`)")


def test_downloaded_files_are_judged_by_their_headers(glm4v_model: DemoModelPaths,
                                                      tmp_path: Path) -> None:
    """The registry says mllama, but the files on disk are glm4 + glm4v: the headers win,
    since they are what llama.cpp will load."""
    target = tmp_path / "models" / "some-vl"
    target.mkdir(parents=True)
    shutil.copy(glm4v_model.text, target / "model.gguf")
    shutil.copy(glm4v_model.mmproj, target / "mmproj.gguf")
    out = models(write_registry(tmp_path / "r.yaml", arch="mllama", projector="mllama"),
                 tmp_path / "models")
    assert out.splitlines()[0].startswith("some-vl  [ready]")
    assert out.splitlines()[1] == ("    family Some-VL; glm4 + glm4v: supported by llama.cpp "
                                   "in llama-cpp-python 0.3.36")
