"""Settings: defaults < YAML preset (--config / VLSERVE_CONFIG) < VLSERVE_* env < CLI flags."""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

DEFAULT_CONFIG = Path("configs/default.yaml")
_DEFAULT_MODEL = Path("models/demo/demo-llava-text.gguf")
# A preset's settings that describe the preset's own model file: when another model is
# served (--model or VLSERVE_MODEL), the preset's values for these are left out, so the
# demo's name or projector never sticks to someone else's model.
_MODEL_BOUND = ("mmproj", "model_name")


class ConfigError(Exception):
    """A configuration problem, reported as one line (the CLI exits with code 2)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VLSERVE_", extra="forbid", validate_default=True, protected_namespaces=(),
        # "inf" for a TTL passed, then broke Redis's expiry (an OverflowError at startup).
        allow_inf_nan=False,
    )

    # Model files and identity. mmproj None (YAML `mmproj: null`): a text-only model, whose
    # image requests get 400. A preset's mmproj and model_name belong to the preset's model:
    # when another model is served (--model), they are left out (see load_settings).
    model: Path = _DEFAULT_MODEL
    mmproj: Path | None = Path("models/demo/demo-llava-mmproj.gguf")
    # The name served in the API; None: the GGUF's general.name as an id ("Gemma 3 270m" →
    # "gemma-3-270m"), else the file stem. Always a string after validation.
    model_name: str | None = None
    make_demo_model_if_missing: bool = False
    # A known template's name (vicuna, chatml, gemma, llama-3, youtu-vl; see
    # server/engine/templates.py), a path to a .jinja file, or inline Jinja text. None: the
    # GGUF's own tokenizer.chat_template, else its architecture's entry, else vicuna.
    chat_template: str | None = None
    # A thinking model's answers (a chat template that knows <think> ... </think>): "auto"
    # returns the reasoning as `reasoning_content` beside the answer's `content` (as
    # llama-server and vLLM do); "none" leaves it in `content` as the model wrote it.
    reasoning_format: Literal["auto", "none"] = "auto"
    # Extra stop strings for every request, beside the template's next-turn markers.
    stop: list[str] = Field(default_factory=list)

    # HTTP.
    host: str = "127.0.0.1"  # loopback unless a preset or flag deliberately opens it
    port: int = Field(7860, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Origins allowed to call the API from a browser (e.g. "https://app.example"); none: no
    # CORS headers at all.
    cors_origins: Annotated[list[str], NoDecode] = []
    # Sent as the X-Vlserve-Replica response header when set: which replica behind a router
    # answered (`vlserve cluster` names its replicas r0, r1, ...). Must be a plain token.
    replica_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    # Seconds that in-flight requests get to finish after SIGTERM before the server exits.
    drain_timeout: float = Field(30.0, ge=0)

    # Auth: with no keys every route is open. Keys come from api_keys (YAML, or
    # VLSERVE_API_KEYS as a JSON list or comma-separated), api_key (VLSERVE_API_KEY: one key
    # or several comma-separated) and api_key_file (one key per line, # comments); after
    # loading, api_keys holds all of them. SecretStr keeps them out of reprs and logs.
    api_keys: Annotated[list[SecretStr], NoDecode] = []
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    # How often api_key_file is looked at for a change (server.api.keyring); SIGHUP at once.
    api_key_file_poll_s: float = Field(2.0, gt=0)
    # The keys not from api_key_file: they stay when the file is rotated.
    _fixed_keys: list[str] = PrivateAttr(default_factory=list)
    metrics_open: bool = False  # True: /metrics answers without a key
    playground: bool = True  # the web page at / and /playground (no API access of its own)

    # llama.cpp context.
    n_ctx: int = Field(4096, ge=64)
    n_batch: int = Field(512, ge=1)
    n_ubatch: int = Field(512, ge=1)
    n_threads: int = Field(0, ge=0)  # 0: one fewer than the usable cores (server/cpus.py)
    n_gpu_layers: int = 0  # -1: all layers
    mmproj_use_gpu: bool = True  # only matters in a GPU build
    n_parallel: int = Field(4, ge=1, le=64)  # slots decoded together in one batch
    flash_attn: Literal["auto", "on", "off"] = "auto"

    # HTTP request limits: a body over max_request_bytes gets 413 (50 MiB, OpenAI's limit for
    # a request with images: one image at image_max_bytes fits, base64 and all); request line
    # plus headers over max_header_bytes get 431; JSON nested deeper than max_json_depth 400.
    max_request_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(16 * 1024, ge=1024)
    max_json_depth: int = Field(64, ge=8)
    # Connection limits (server/http_protocol.py), in seconds: the request line and headers
    # must arrive within header_timeout (from connect or the head's first byte), a body within
    # body_timeout of its headers (else 408 and the connection closed); a client that reads
    # nothing of its answer for write_timeout is cut off (a stream is cancelled: 499).
    header_timeout: float = Field(10.0, gt=0)
    body_timeout: float = Field(60.0, gt=0)
    write_timeout: float = Field(30.0, gt=0)
    # Open connections beyond this get a 503 and are closed; requests pipelined on one
    # connection beyond max_pipelined_requests stay unread until the earlier ones are answered.
    max_connections: int = Field(512, ge=1)
    max_pipelined_requests: int = Field(16, ge=1)

    # Generation limits.
    default_max_tokens: int = Field(512, ge=1)
    max_tokens_cap: int = Field(2048, ge=1)
    max_queue: int = Field(64, ge=1)  # waiting requests beyond the busy slots; then 429
    # Predicted Outputs (`prediction`): at most this many predicted tokens are checked per
    # request and step (server/engine/prediction.py), fewer where longer steps would not pay
    # (their cost is measured at warm-up); 0: predictions are ignored.
    prediction_max_draft: int = Field(16, ge=0, le=64)
    # What one more position costs a decode step, relative to a step of one position, for
    # pacing drafts; None: measured at warm-up (server/engine/step_costs.py).
    prediction_position_cost: float | None = Field(None, gt=0, le=10)
    # Beside another request's stream, drafts may make a decode step at most this many
    # times as long as without them: that stream's inter-token time is what they cost it.
    # 1.0: no drafts beside other requests' streams unless they are free.
    prediction_max_slowdown: float = Field(1.5, ge=1.0, le=100)
    # Without a prediction, draft from the request's own text: the tokens that followed the
    # answer's last few where they occurred before (server/engine/lookup.py), paced and
    # bounded as predictions are. Off by default, as llama-server's n-gram drafts are: it
    # pays where answers repeat their context (quotes, edits, loops), costs a little
    # elsewhere, and batched steps round logits differently from single ones, so a
    # near-tie may go the other way than with it off.
    prompt_lookup: bool = False
    # Generation requests one API key may have in flight at once (then 429), so one tenant
    # cannot take every slot and the queue. None: no limit per key (server.api.key_limits).
    max_requests_per_key: int | None = Field(None, ge=1)
    request_timeout: float = Field(600.0, gt=0)  # seconds from admission to the last token
    # A decode step or image encode that has not returned after this many seconds means a
    # hung engine (wedged driver, deadlock): /health turns 503 and the process exits 1 so
    # its supervisor restarts it. Generous: a CPU-only encode of a big image can take 90 s.
    # 0 turns the watchdog off.
    engine_watchdog_s: float = Field(300.0, ge=0)

    # Images.
    image_max_side: int = Field(1024, ge=16)  # upper bound; fixed-size projectors use less
    # Image tokens per image for dynamic-resolution projectors (youtuvl); None: the
    # projector's own limit. Passed to mtmd too, so both sides agree.
    image_max_tokens: int | None = Field(None, ge=1)
    # Per-image `detail` (dynamic-resolution projectors only; fixed-size ones ignore it).
    # `auto` (or none) uses the two caps above. `low`: a small budget, never above `auto`'s.
    # `high`: up to image_high_max_side, and image_high_max_tokens (None: the projector's
    # own maximum, e.g. youtuvl 62,500); 2048 px gives a 1080p photo 2,040 youtuvl tokens.
    image_low_max_side: int = Field(512, ge=16)
    image_low_max_tokens: int = Field(64, ge=1)
    image_high_max_side: int = Field(2048, ge=16)
    image_high_max_tokens: int | None = Field(None, ge=1)
    image_max_bytes: int = Field(20 * 1024 * 1024, ge=1)  # per image, after base64 decoding
    image_max_pixels: int = Field(8192 * 8192, ge=1)  # from the header, before decoding
    image_min_side: int = Field(2, ge=1)
    image_formats: list[Literal["JPEG", "PNG", "WEBP", "GIF", "BMP"]] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF", "BMP"], min_length=1)
    # Decode memory: one image's peak, worked out from its header before any pixel is decoded
    # (over it: 413), and all decodes in flight together, chats and uploads alike (beyond it,
    # decodes wait their turn). 320 MiB lets a full 8192 x 8192 RGB PNG through (~270 MiB).
    image_decode_max_mb: int = Field(320, ge=1)
    image_decode_budget_mb: int = Field(640, ge=1)
    max_images_per_request: int = Field(8, ge=0)
    image_cache_mb: int = Field(256, ge=0)  # encoded image embeddings kept for reuse
    # Decoded pixels kept for reuse: each turn of an image chat sends the image again.
    image_pixel_cache_mb: int = Field(128, ge=0)
    # Idle slots' KV moved to host RAM (and back when their conversation continues), so the
    # running requests attend over their own cells only; 0 keeps idle caches in the KV cache.
    prompt_cache_ram_mb: int = Field(1024, ge=0)
    # An idle engine copies idle slots there ahead of need, so the next request starts with
    # them out of the KV cache; false: they move only once a request runs long (a stall).
    prompt_cache_copy_ahead: bool = True
    # After an answer, an idle engine evaluates what the conversation's next turn starts
    # with (the answer's end-of-turn and next-user markup), so that turn evaluates only
    # its new text (server/engine/next_turn.py).
    next_turn_prefill: bool = True
    # With API keys, each key's requests reuse only their own KV prefixes and image
    # embeddings (a hit would tell one key what another sent). True shares them across keys:
    # faster for a single trusted team using several keys, a side channel otherwise.
    cache_sharing: bool = False
    # http(s) image URLs: off by default. When on, only public addresses are fetched, plus
    # the networks listed here (e.g. an internal image store: ["10.20.0.0/16"]).
    remote_images: bool = False
    remote_image_timeout: float = Field(10.0, gt=0)
    remote_image_allow_networks: list[str] = Field(default_factory=list)

    # Uploads (POST /files): kept decoded in memory, never written to disk.
    upload_max_bytes: int = Field(20 * 1024 * 1024, ge=1)
    upload_max_files: int = Field(256, ge=1)
    upload_store_mb: int = Field(512, ge=1)
    upload_ttl_s: float = Field(3600.0, gt=0)
    # Each API key's own share: its uploads past these evict its own least recently used
    # files, never another key's. None: the store's limits split evenly among the keys.
    upload_max_files_per_key: int | None = Field(None, ge=1)
    upload_store_mb_per_key: int | None = Field(None, ge=1)

    # Batch jobs (POST /files purpose=batch, /batches): input files, state and results live
    # on disk under batch_dir, so a restarted server resumes its batches. An input file is
    # at most batch_max_bytes (and within max_request_bytes, as every request body) and
    # batch_max_lines requests. batch_in_flight: batch lines handed to the engine at once
    # (None: n_parallel + 1, one per slot and one waiting); they run below interactive
    # requests' priority.
    batch_dir: Path = Path("data/batches")
    batch_max_bytes: int = Field(48 * 1024 * 1024, ge=1)
    batch_max_lines: int = Field(50_000, ge=1)
    batch_in_flight: int | None = Field(None, ge=1)
    # What batch files (inputs, and the output and error files batches write) may take in
    # all, and per API key (None: an even share among the keys); past them an upload is
    # refused (413 for the key's share, 507 for the whole), never a batch's own results.
    # batch_store_mb None: 20 GiB on disk, 1 GiB with a shared state_url (Redis holds them
    # in memory). batch_max_open_per_key: a key's batches not yet ended; past it, a 429.
    batch_store_mb: int | None = Field(None, ge=1)
    batch_max_files: int = Field(10_000, ge=1)
    batch_store_mb_per_key: int | None = Field(None, ge=1)
    batch_max_files_per_key: int | None = Field(None, ge=1)
    batch_max_open_per_key: int = Field(100, ge=1)
    # With a shared state_url: the lease a replica holds on each batch it runs, renewed
    # every third of this. A replica that dies loses its batches after this many seconds,
    # and another replica resumes them.
    batch_lease_s: float = Field(15.0, ge=0.5)
    # Nothing is kept forever. Batch input files and the output and error files batches
    # write expire this long after they are created (OpenAI's default: 30 days) unless the
    # upload's `expires_after` (or the batch's `output_expires_after`) says otherwise; a
    # finished batch is forgotten batch_retention_s after it ended. None: kept until deleted.
    batch_file_ttl_s: int | None = Field(30 * 86400, ge=1)
    batch_retention_s: int | None = Field(30 * 86400, ge=1)

    # Stored responses (POST /responses with `store`, the default): kept in memory for
    # GET /responses/{id} and `previous_response_id`, each API key an even share of them.
    responses_max_stored: int = Field(1000, ge=1)
    responses_store_mb: int = Field(256, ge=1)
    responses_ttl_s: float = Field(3600.0, gt=0)
    # Conversations (POST /conversations, `conversation` on /responses): each API key an even
    # share; one not written for conversations_ttl_s goes, and a key over its share loses
    # its least recently used one first.
    conversations_max_stored: int = Field(1000, ge=1)
    conversations_store_mb: int = Field(256, ge=1)
    conversations_ttl_s: float = Field(30 * 86400.0, gt=0)
    # Background responses (`background: true`) this replica holds at once, waiting or
    # generating (each waiting one keeps its decoded images), in all and per API key; past
    # them creating one is a 429.
    background_max_runs: int = Field(256, ge=1)
    background_max_runs_per_key: int = Field(64, ge=1)
    # Stored chat completions (POST /chat/completions with `store: true`): kept for
    # GET /chat/completions (and /{id}, its messages), each API key an even share of them;
    # oldest first out, gone chat_completions_ttl_s after they were stored.
    chat_completions_max_stored: int = Field(1000, ge=1)
    chat_completions_store_mb: int = Field(256, ge=1)
    chat_completions_ttl_s: float = Field(3600.0, gt=0)

    # Where uploads, stored responses and batch jobs live (server.store, server.batches):
    # "memory://" (this process, batches on disk under batch_dir: the single-box default) or
    # "redis://host:port/db" (shared by every replica pointed at it: a file uploaded, a
    # response stored or a batch created on one is usable from all; each batch runs on the
    # replica holding its lease, batch_lease_s). The bounds above hold either way. A Redis
    # call over state_timeout_s answers 503, never hangs.
    state_url: str = "memory://"
    state_timeout_s: float = Field(5.0, gt=0)
    # With memory://: a file the stored responses, conversations and chat completions are
    # written to, and read back from at the next start, so a restart keeps them
    # (server.store.snapshot; the Docker image and the supervisord program set it under
    # their data dir). None: they live and die with the process. Written every
    # state_snapshot_interval_s while they change (a crash loses at most that much) and at
    # a graceful stop; 0: only at the stop, the file deleted once the server started from
    # it (a crash loses everything since).
    state_snapshot: Path | None = None
    state_snapshot_interval_s: float = Field(300.0, ge=0)

    # Warm-up and prompts.
    system_prompt: str | None = None  # used for requests that bring no system message
    warmup: bool = True

    @field_validator("state_url")
    @classmethod
    def _state_scheme(cls, value: str) -> str:
        """A typo'd URL fails at startup, not on the first upload."""
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in ("memory", "redis", "rediss", "unix"):
            raise ValueError("expected memory://, redis://host:port/db, rediss://... or "
                             f"unix:///path.sock (got {value!r})")
        return value

    @field_validator("state_snapshot", mode="before")
    @classmethod
    def _snapshot_off(cls, value: Any) -> Any:
        """Empty turns it off: how an image's default (`VLSERVE_STATE_SNAPSHOT=`) is unset."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("state_snapshot")
    @classmethod
    def _snapshot_file(cls, value: Path | None) -> Path | None:
        """A file, not a directory (the data dir, renamed aside as a bad snapshot)."""
        if value is not None and (value == Path(".") or value.is_dir()):
            raise ValueError(f"expected a file path, not the directory {str(value)!r}")
        return value

    @field_validator("cors_origins", "api_keys", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """Env vars arrive as one string: a JSON list, or comma-separated items."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

    @model_validator(mode="after")
    def _gather_api_keys(self) -> Settings:
        keys = [key.get_secret_value().strip() for key in self.api_keys]
        if self.api_key is not None:
            keys += [k.strip() for k in self.api_key.get_secret_value().split(",") if k.strip()]
        self._fixed_keys = list(dict.fromkeys(keys))
        if self.api_key_file is not None:
            keys += read_key_file(self.api_key_file)
        if any(not key or any(c.isspace() for c in key) for key in keys):
            raise ValueError("API keys must be non-empty and contain no whitespace")
        self.api_keys = [SecretStr(key) for key in dict.fromkeys(keys)]
        return self

    @property
    def fixed_api_keys(self) -> list[str]:
        """The keys from api_keys and api_key (YAML, env): those a key file rotation keeps."""
        return list(self._fixed_keys)

    @field_validator("remote_image_allow_networks")
    @classmethod
    def _check_networks(cls, networks: list[str]) -> list[str]:
        for network in networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not an IP network (e.g. 10.0.0.0/8)") from None
        return networks

    @model_validator(mode="after")
    def _name_the_model(self) -> Settings:
        if "mmproj" not in self.model_fields_set and self.model != _DEFAULT_MODEL:
            self.mmproj = None  # the default projector is the demo model's, no one else's
        if not self.model_name:
            self.model_name = served_name_of(self.model)
        return self

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds "
                f"max_tokens_cap ({self.max_tokens_cap})"
            )
        if self.image_decode_max_mb > self.image_decode_budget_mb:
            raise ValueError(f"image_decode_max_mb ({self.image_decode_max_mb}) exceeds "
                             f"image_decode_budget_mb ({self.image_decode_budget_mb})")
        if self.image_max_side > self.image_high_max_side:
            raise ValueError(f"image_max_side ({self.image_max_side}) exceeds "
                             f"image_high_max_side ({self.image_high_max_side})")
        high = self.image_high_max_tokens
        for name in ("image_max_tokens", "image_low_max_tokens"):
            value = getattr(self, name)
            if high is not None and value is not None and value > high:
                raise ValueError(f"{name} ({value}) exceeds image_high_max_tokens ({high})")
        if self.n_ubatch > self.n_batch:
            raise ValueError(f"n_ubatch ({self.n_ubatch}) exceeds n_batch ({self.n_batch})")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_path = _yaml_path_for_load
        if yaml_path is not None:
            sources.append(_PresetSource(settings_cls, yaml_path, _yaml_keys_left_out))
        return tuple(sources)


class _PresetSource(YamlConfigSettingsSource):
    """The YAML preset, less the keys that belong to a model other than the one served."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path, leave_out: set[str]
                 ) -> None:
        super().__init__(settings_cls, yaml_file=path)
        self._leave_out = leave_out

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in super().__call__().items() if k not in self._leave_out}


# Set only for the duration of one load_settings() call: pydantic-settings builds its
# sources from the class, so the chosen YAML file has to be reachable from there.
_yaml_path_for_load: Path | None = None
_yaml_keys_left_out: set[str] = set()


def served_name_of(model: Path) -> str:
    """The GGUF's general.name as an API id (lower case, spaces to dashes), else the stem."""
    from server.gguf_meta import GGUFMetaError, read_gguf_metadata

    try:
        name = read_gguf_metadata(model).get("general.name")
    except (OSError, GGUFMetaError):
        name = None
    if isinstance(name, str) and name.strip():
        return "-".join(name.strip().lower().split())
    return Path(model).stem


def load_settings(config_path: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from a YAML file, VLSERVE_* env vars and explicit overrides."""
    global _yaml_path_for_load, _yaml_keys_left_out
    import os

    if config_path is None and os.environ.get("VLSERVE_CONFIG"):
        config_path = Path(os.environ["VLSERVE_CONFIG"])
    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = DEFAULT_CONFIG
    preset: dict[str, Any] = {}
    if config_path is not None:
        if not config_path.is_file():
            raise ConfigError(f"config file not found: {config_path}")
        preset = _check_yaml(config_path)
    cli = {k: v for k, v in overrides.items() if v is not None}
    _check_env_names(os.environ)
    _yaml_path_for_load = config_path
    _yaml_keys_left_out = _keys_of_another_model(preset, cli, os.environ)
    try:
        return Settings(**cli)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, config_path)) from None
    finally:
        _yaml_path_for_load = None
        _yaml_keys_left_out = set()


# VLSERVE_* names that are not settings: the config file, the model registry, the bench's
# llama-server, and the test suite's own (VLSERVE_TEST_*).
_NOT_SETTINGS = ("VLSERVE_CONFIG", "VLSERVE_REGISTRY", "VLSERVE_LLAMA_BIN")
# What Kubernetes puts in every pod for each Service (a Service named vlserve or
# vlserve-redis gives VLSERVE_SERVICE_HOST, VLSERVE_REDIS_PORT_6379_TCP_ADDR, ...) unless
# the pod spec says enableServiceLinks: false.
_SERVICE_LINK = re.compile(r"VLSERVE(_[A-Z0-9_]+?)?_(SERVICE_(HOST|PORT(_[A-Z0-9_]+)?)"
                           r"|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)")


def _check_env_names(env: Mapping[str, str]) -> None:
    """A misspelt VLSERVE_* variable is an error, not a setting silently left at its
    default (VLSERVE_API_KEYS_FILE for VLSERVE_API_KEY_FILE served without keys)."""
    known = {f"VLSERVE_{name.upper()}" for name in Settings.model_fields} | set(_NOT_SETTINGS)
    for name in sorted(env):
        upper = name.upper()
        if upper.startswith("VLSERVE_") and upper not in known and not upper.startswith(
                "VLSERVE_TEST_") and not _SERVICE_LINK.fullmatch(upper):
            close = difflib.get_close_matches(upper, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown environment variable {name}{hint}: every VLSERVE_* "
                              "variable names a setting (README \"Configuration\")")


def _keys_of_another_model(preset: dict[str, Any], cli: dict[str, Any],
                           env: Mapping[str, str]) -> set[str]:
    """The preset's model-bound keys to leave out, when its model is not the one served."""
    env_keys = {k.upper() for k in env}
    served = cli.get("model") or env.get("VLSERVE_MODEL")
    own = preset.get("model")
    if served is None or own is None or _same_file(Path(served), Path(str(own))):
        return set()
    return {k for k in _MODEL_BOUND
            if k not in cli and f"VLSERVE_{k.upper()}" not in env_keys}


def _same_file(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def read_key_file(path: Path) -> list[str]:
    """The keys of an api_key_file (at the start, and each time it changes:
    server.api.keyring); ValueError when it cannot serve as one."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read api_key_file {path}: {exc.strerror}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        # An empty file would silently switch auth off: refuse it.
        raise ValueError(f"api_key_file {path} contains no keys")
    return keys


def _check_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}".replace("\n", " ")) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of settings")
    return data or {}


def _one_line(exc: ValidationError, path: Path | None) -> str:
    where = f"{path}: " if path else ""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"{loc}: {msg}")
    return f"invalid configuration: {where}" + "; ".join(problems)
