"""`vlserve make-demo-model --family` and generating a missing demo model at `serve` time."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import _ensure_model_files, main
from server.config import ConfigError, Settings
from server.demo_model import FAMILIES, demo_model_paths


@pytest.mark.parametrize("family", FAMILIES)
def test_make_demo_model_writes_the_family(tmp_path: Path, family: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-demo-model", str(tmp_path), "--family", family]) == 0
    paths = demo_model_paths(tmp_path, family=family)  # type: ignore[arg-type]
    assert paths.text.is_file() and paths.mmproj.is_file()
    assert str(paths.text) in capsys.readouterr().out


@pytest.mark.parametrize("family", FAMILIES)
def test_serve_generates_the_family_its_file_names_name(tmp_path: Path, family: str) -> None:
    paths = demo_model_paths(tmp_path, family=family)  # type: ignore[arg-type]
    _ensure_model_files(Settings(model=paths.text, mmproj=paths.mmproj,
                                 make_demo_model_if_missing=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [paths.text.name, paths.mmproj.name])


def test_other_file_names_are_not_generated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"demo-youtu-vl-text\.gguf"):
        _ensure_model_files(Settings(model=tmp_path / "x.gguf", mmproj=tmp_path / "y.gguf",
                                     make_demo_model_if_missing=True))
    assert not any(tmp_path.iterdir())
