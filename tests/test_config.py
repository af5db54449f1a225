"""Settings precedence and one-line errors for bad configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import main
from server.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_then_env_then_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, "port: 9001\nn_ctx: 2048\nmodel_name: from-yaml\n")
    settings = load_settings(config)
    assert (settings.port, settings.n_ctx, settings.model_name) == (9001, 2048, "from-yaml")
    monkeypatch.setenv("VLSERVE_PORT", "9002")
    monkeypatch.setenv("VLSERVE_MODEL_NAME", "from-env")
    settings = load_settings(config)
    assert (settings.port, settings.model_name) == (9002, "from-env")
    settings = load_settings(config, port=9003, model_name=None)
    assert (settings.port, settings.model_name) == (9003, "from-env")


def test_config_from_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLSERVE_CONFIG", str(write(tmp_path, "n_parallel: 3\n")))
    assert load_settings().n_parallel == 3


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")))
def test_shipped_presets_are_valid(preset: Path) -> None:
    settings = load_settings(preset)
    assert settings.default_max_tokens <= settings.max_tokens_cap
    assert settings.model_name


@pytest.mark.parametrize("text, fragment", [
    ("port: lots\n", "port"),
    ("no_such_setting: 1\n", "no_such_setting"),
    ("default_max_tokens: 5000\nmax_tokens_cap: 100\n", "exceeds max_tokens_cap"),
    ("image_max_side: 4096\nimage_high_max_side: 2048\n", "exceeds image_high_max_side"),
    ("image_high_max_tokens: 100\nimage_low_max_tokens: 200\n",
     "image_low_max_tokens (200) exceeds image_high_max_tokens (100)"),
    ("image_high_max_tokens: 100\nimage_max_tokens: 200\n",
     "image_max_tokens (200) exceeds image_high_max_tokens (100)"),
    ("image_low_max_tokens: 0\n", "image_low_max_tokens"),
    ("- a\n- b\n", "mapping"),
    ("port: [unclosed\n", "invalid YAML"),
])
def test_bad_config_is_one_clear_line(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text))
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_a_misspelt_environment_variable_is_an_error(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """VLSERVE_API_KEYS_FILE (for VLSERVE_API_KEY_FILE) used to leave the server open with
    no keys; now it names the setting meant."""
    monkeypatch.setenv("VLSERVE_API_KEYS_FILE", "/run/keys")
    with pytest.raises(ConfigError) as err:
        load_settings(None)
    assert "unknown environment variable VLSERVE_API_KEYS_FILE (did you mean " \
        "VLSERVE_API_KEY_FILE?)" in str(err.value)
    monkeypatch.delenv("VLSERVE_API_KEYS_FILE")
    # Names that are not settings but are vlserve's: the config file, the registry, the
    # bench's llama-server, the test suite's own.
    for name in ("VLSERVE_REGISTRY", "VLSERVE_LLAMA_BIN", "VLSERVE_TEST_ANYTHING"):
        monkeypatch.setenv(name, "x")
    # What Kubernetes puts in a pod for Services named vlserve and vlserve-redis.
    for name in ("VLSERVE_SERVICE_HOST", "VLSERVE_SERVICE_PORT_HTTP",
                 "VLSERVE_PORT_7860_TCP_ADDR", "VLSERVE_REDIS_PORT",
                 "VLSERVE_REDIS_PORT_6379_TCP_PROTO"):
        monkeypatch.setenv(name, "10.0.0.1")
    assert load_settings(None).api_keys == []


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_ttl_of_infinity_is_refused_at_load(monkeypatch: pytest.MonkeyPatch, value: str
                                               ) -> None:
    """`inf` passed validation, then broke Redis's expiry with an OverflowError at startup."""
    monkeypatch.setenv("VLSERVE_CONVERSATIONS_TTL_S", value)
    with pytest.raises(ConfigError, match="conversations_ttl_s"):
        load_settings(None)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(Path("/nonexistent/vlserve.yaml"))


def test_cli_exits_2_without_traceback(tmp_path: Path) -> None:
    config = write(tmp_path, "n_ctx: -5\n")
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "n_ctx" in proc.stderr


def test_missing_model_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    config = write(tmp_path, "model: /nope/model.gguf\nmmproj: /nope/mmproj.gguf\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "model file not found: /nope/model.gguf" in capsys.readouterr().err


def secrets(settings: object) -> list[str]:
    return [key.get_secret_value() for key in settings.api_keys]


def test_api_keys_from_env_file_and_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    assert load_settings(None).api_keys == []
    monkeypatch.setenv("VLSERVE_API_KEY", "sk-plain")  # one plain key, not JSON
    assert secrets(load_settings(None)) == ["sk-plain"]
    monkeypatch.setenv("VLSERVE_API_KEY", "sk-one, sk-two")
    assert secrets(load_settings(None)) == ["sk-one", "sk-two"]
    monkeypatch.setenv("VLSERVE_API_KEYS", '["sk-json"]')
    assert secrets(load_settings(None)) == ["sk-json", "sk-one", "sk-two"]
    monkeypatch.setenv("VLSERVE_API_KEYS", "sk-c1,sk-c2")
    key_file = tmp_path / "keys"
    key_file.write_text("# operators\nsk-file\n\n  sk-one  \n")
    config = write(tmp_path, f"api_keys: [sk-yaml]\napi_key_file: {key_file}\n")
    monkeypatch.delenv("VLSERVE_API_KEYS")
    # YAML list + env key + file, duplicates folded.
    assert secrets(load_settings(config)) == ["sk-yaml", "sk-one", "sk-two", "sk-file"]


def test_keys_stay_out_of_reprs_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    monkeypatch.setenv("VLSERVE_API_KEY", "sk-secret-123")
    settings = load_settings(None)
    assert "sk-secret-123" not in repr(settings) and "sk-secret-123" not in str(settings)
    assert "sk-secret-123" not in settings.model_dump_json()
    monkeypatch.setenv("VLSERVE_API_KEY", "sk-secret-123,has space")
    with pytest.raises(ConfigError) as err:
        load_settings(None)
    assert "whitespace" in str(err.value) and "sk-secret" not in str(err.value)


@pytest.mark.parametrize("text, fragment", [
    ("# only a comment\n\n", "contains no keys"),  # would silently switch auth off
    (None, "cannot read api_key_file"),
])
def test_bad_key_file(tmp_path: Path, text: str | None, fragment: str) -> None:
    key_file = tmp_path / "keys"
    if text is not None:
        key_file.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_settings(write(tmp_path, f"api_key_file: {key_file}\n"))


def test_cors_metrics_and_drain_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    settings = load_settings(None)
    assert (settings.cors_origins, settings.metrics_open, settings.host) == ([], False,
                                                                             "127.0.0.1")
    assert settings.drain_timeout > 0
    with pytest.raises(ConfigError, match="drain_timeout"):
        load_settings(write(tmp_path, "drain_timeout: -1\n"))
    monkeypatch.setenv("VLSERVE_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("VLSERVE_METRICS_OPEN", "true")
    monkeypatch.setenv("VLSERVE_DRAIN_TIMEOUT", "2.5")
    settings = load_settings(None)
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.metrics_open is True and settings.drain_timeout == 2.5


def test_another_model_on_a_preset_is_named_by_its_gguf(demo_model, youtu_model,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """--model X on the demo preset: the demo's name and projector stay with the demo."""
    default = ROOT / "configs" / "default.yaml"
    other = load_settings(default, model=youtu_model.text)
    assert other.model_name == "vlserve-demo-youtu-vl-tiny"  # its general.name, as an id
    assert other.mmproj is None
    paired = load_settings(default, model=youtu_model.text, mmproj=youtu_model.mmproj)
    assert paired.mmproj == youtu_model.mmproj
    assert load_settings(default, model=youtu_model.text, model_name="mine").model_name == "mine"
    monkeypatch.setenv("VLSERVE_MODEL", str(youtu_model.text))
    assert load_settings(default).model_name == "vlserve-demo-youtu-vl-tiny"


def test_the_presets_own_model_keeps_the_presets_name(demo_model, tmp_path: Path) -> None:
    preset = write(tmp_path, f"model: {demo_model.text}\nmmproj: {demo_model.mmproj}\n"
                             "model_name: from-preset\n")
    for settings in (load_settings(preset), load_settings(preset, model=demo_model.text)):
        assert (settings.model_name, settings.mmproj) == ("from-preset", demo_model.mmproj)


def test_a_file_without_general_name_is_named_by_its_stem(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "My-Model.Q4.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")  # general.architecture, no general.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert load_settings(None, model=path).model_name == "My-Model.Q4"
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model")
    assert load_settings(None, model=not_gguf).model_name == "notes"


@pytest.mark.parametrize("value, fragment", [
    ("vicunaa", "neither a known template (chatml, gemma,"),
    ("/nope/chat.jinja", "chat_template file /nope/chat.jinja: No such file"),
])
def test_a_bad_chat_template_is_a_config_error(tmp_path: Path, value: str, fragment: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Found before the model loads: exit 2 and one line."""
    config = write(tmp_path, "model: /nope/model.gguf\nmmproj: null\n")
    assert main(["serve", "--config", str(config), "--chat-template", value]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "model file not found" not in err


def test_default_threads_leave_a_core_free(demo_model) -> None:
    from server.config import load_settings
    from server.cpus import default_threads, usable_cores
    from server.engine.model import load_model

    assert [default_threads(c) for c in (1, 2, 4, 16)] == [1, 1, 3, 15]
    loaded = load_model(load_settings(None, model=demo_model.text, mmproj=demo_model.mmproj,
                                      n_threads=0, n_parallel=1))
    try:
        assert loaded.info["n_threads"] == default_threads(usable_cores().usable)
    finally:
        loaded.close()
