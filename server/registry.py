"""The model registry (models/registry.yaml): what can be downloaded, and where it goes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.config import ConfigError

DEFAULT_REGISTRY = Path("models/registry.yaml")
DEFAULT_MODELS_DIR = Path("models")

_SHA256 = r"^[0-9a-f]{64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelFile(_Strict):
    name: str = Field(pattern=r"^[^/\\]+$")  # a file name in the repo root, never a path
    quant: str
    size: str | None = None  # for people; not checked
    sha256: str | None = Field(None, pattern=_SHA256)


class ModelFiles(_Strict):
    model: ModelFile
    mmproj: ModelFile | None = None  # None: a text-only model


class RegistryEntry(_Strict):
    """Where a model comes from: a Hugging Face repo, or a Python package on the package
    index (`package`) whose module's assemble(path) writes the model file (e.g. a GGUF
    split into chunk packages); exactly one of the two."""

    name: str
    title: str
    repo: str | None = Field(None, pattern=r"^[\w.-]+/[\w.-]+$")
    package: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*$")
    revision: str = "main"
    dir: str = Field(pattern=r"^[\w.-]+$")
    preset: str | None = None
    served_name: str | None = None
    architecture: str | None = None  # for people: the model's shape in words
    # What llama.cpp dispatches on (general.architecture, clip.projector_type): `vlserve
    # models` says from these whether this build can load the model before it is downloaded.
    family: str | None = None
    text_architecture: str | None = Field(None, pattern=r"^[\w.-]+$")
    projector_type: str | None = Field(None, pattern=r"^[\w.-]+$")
    context_length: int | None = None
    chat_template: str | None = None
    files: ModelFiles

    @model_validator(mode="after")
    def _one_source(self) -> RegistryEntry:
        if (self.repo is None) == (self.package is None):
            raise ValueError("give exactly one source: repo (Hugging Face) or package")
        if self.package is not None and (self.files.mmproj is not None
                                         or self.files.model.sha256 is None):
            raise ValueError("a package source provides one model file, with its sha256")
        return self

    @property
    def origin(self) -> str:
        """Where the files come from, for people: the Hub repo or pypi:<package>."""
        return self.repo if self.repo is not None else f"pypi:{self.package}"

    def file_list(self) -> list[tuple[Literal["model", "mmproj"], ModelFile]]:
        files: list[tuple[Literal["model", "mmproj"], ModelFile]] = [("model", self.files.model)]
        if self.files.mmproj is not None:
            files.append(("mmproj", self.files.mmproj))
        return files

    def target_dir(self, models_dir: Path) -> Path:
        return models_dir / self.dir


def registry_path(explicit: Path | None = None) -> Path:
    """--registry, else VLSERVE_REGISTRY (the Docker image sets it), else models/registry.yaml."""
    if explicit is not None:
        return explicit
    return Path(os.environ.get("VLSERVE_REGISTRY") or DEFAULT_REGISTRY)


def load_registry(path: Path) -> dict[str, RegistryEntry]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read model registry {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}".replace("\n", " ")) from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ConfigError(f"{path}: expected a top-level 'models:' mapping")
    entries = {}
    for name, raw in models.items():
        try:
            entries[str(name)] = RegistryEntry(name=str(name), **(raw or {}))
        except (ValidationError, TypeError) as exc:
            raise ConfigError(f"{path}: model {name!r}: {_first_problem(exc)}") from None
    return entries


def find_entry(entries: dict[str, RegistryEntry], name: str) -> RegistryEntry:
    """Look a model up by registry name, Hub repo id or served name (case-insensitive)."""
    wanted = name.lower()
    for entry in entries.values():
        if wanted in {entry.name.lower(), (entry.repo or "").lower(),
                      (entry.package or "").lower(), (entry.served_name or "").lower()}:
            return entry
    known = ", ".join(sorted(entries))
    raise ConfigError(f"unknown model {name!r} (known: {known})")


def _first_problem(exc: ValidationError | TypeError) -> str:
    if isinstance(exc, TypeError):
        return str(exc)
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "entry"
    return f"{loc}: {err['msg']}"
