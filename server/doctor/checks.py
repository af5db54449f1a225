"""The doctor's static checks: nothing here loads the model into llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.config import ConfigError, Settings
from server.cpus import Cores, default_threads, oversubscribed
from server.doctor.report import Check
from server.engine.build_info import BuildInfo
from server.engine.placement import rebuild_hint
from server.engine.supported import GgufKinds, gguf_problems, instead
from server.registry import RegistryEntry


def check_build(build: BuildInfo) -> Check:
    cpu = build.features.get("CPU", {})
    simd = [name for name, value in cpu.items() if value == "1"]
    gpus = [f"{d.name} ({d.description}, {d.memory_total_mib} MiB)" for d in build.gpu_devices]
    summary = (f"llama-cpp-python {build.llama_cpp_python} (llama.cpp {build.llama_cpp}); "
               f"backends "
               f"{', '.join(build.backends) or 'none'}; "
               + (f"GPU devices: {'; '.join(gpus)}" if gpus else "no GPU device"))
    lines = [f"CPU features: {' '.join(simd) or 'none reported'}"]
    lines += [f"{name} build: " + " ".join(f"{k}={v}" for k, v in feats.items())
              for name, feats in build.features.items() if name != "CPU"]
    return Check("build", "ok", summary, {**build.as_dict(), "lines": lines})


def check_gpus(build: BuildInfo) -> Check:
    """GPUs the driver sees (NVML), against what llama.cpp can use."""
    nvml = nvml_gpus()
    if isinstance(nvml, str):
        return Check("gpus", "ok", f"no NVIDIA GPU visible ({nvml})", {"nvml": []})
    names = ", ".join(f"{g['name']} ({g['memory_total_mib']} MiB)" for g in nvml)
    if not build.gpu_devices:
        return Check("gpus", "fail", f"NVML sees {len(nvml)} GPU(s) ({names}) but this "
                     f"llama-cpp-python has no GPU backend: {rebuild_hint()}", {"nvml": nvml})
    return Check("gpus", "ok", f"NVML sees {len(nvml)} GPU(s): {names}", {"nvml": nvml})


def check_threads(settings: Settings, cores: Cores) -> Check:
    """llama.cpp's threads against the cores this process may use (quota, affinity)."""
    chosen = settings.n_threads or default_threads(cores.usable)
    details = {"n_threads": chosen, "usable_cores": cores.usable,
               "machine_cores": cores.machine}
    problem = oversubscribed(settings.n_threads, cores)
    if problem is not None:
        return Check("threads", "fail", problem, details)
    return Check("threads", "ok", f"{chosen} llama.cpp thread(s) on {cores.describe()}",
                 details)


def nvml_gpus() -> list[dict[str, Any]] | str:
    """The GPUs NVML reports, or why there are none to report."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return f"NVML: {exc}"
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                         "memory_total_mib": int(memory.total) >> 20,
                         "memory_used_mib": int(memory.used) >> 20})
        return gpus or "NVML reports no GPU"
    except pynvml.NVMLError as exc:
        return f"NVML: {exc}"
    finally:
        pynvml.nvmlShutdown()


def check_files(settings: Settings, registry: Path) -> Check:
    missing = [f"{role} file not found: {path}" for role, path in _files(settings)
               if not Path(path).is_file()]
    if missing:
        try:
            entry = _registry_entry(settings, registry)
        except ConfigError:  # a broken registry is the sha256 check's to report
            entry = None
        how = f"vlserve download {entry.name}" if entry else "vlserve download NAME"
        return Check("files", "fail", "; ".join(missing) + f" (download it with `{how}`, or "
                     "point --model/--mmproj at existing files)")
    sizes = {role: Path(path).stat().st_size for role, path in _files(settings)}
    return Check("files", "ok", ", ".join(f"{role} {path} ({sizes[role] / 2**20:.1f} MiB)"
                                          for role, path in _files(settings)), sizes)


def check_sha256(settings: Settings, registry: Path) -> Check:
    """Compare the files with the registry entry that names them, if there is one."""
    from server.download import sha256_file

    if not registry.is_file():
        return Check("sha256", "skip", f"no model registry at {registry}")
    try:
        entry = _registry_entry(settings, registry)
    except ConfigError as exc:
        return Check("sha256", "fail", str(exc))
    if entry is not None:
        specs = dict(entry.file_list())
        results, problems = {}, []
        for role, path in _files(settings):
            actual = sha256_file(Path(path))
            expected = specs[role].sha256
            results[role] = {"sha256": actual, "expected": expected}
            if expected is not None and actual != expected:
                problems.append(f"{role} {Path(path).name}: sha256 mismatch with registry "
                                f"entry {entry.name} (expected {expected}, file has {actual}); "
                                f"download it again: vlserve download {entry.name} --force")
        if problems:
            return Check("sha256", "fail", "; ".join(problems), results)
        unpinned = [role for role, r in results.items() if r["expected"] is None]
        note = f" ({', '.join(unpinned)} not pinned in the registry)" if unpinned else ""
        return Check("sha256", "ok", f"files match registry entry {entry.name}{note}",
                     {"entry": entry.name, **results})
    return Check("sha256", "skip", f"the files are not in the model registry {registry}")


def check_gguf(kinds: GgufKinds, settings: Settings) -> Check:
    mmproj = Path(settings.mmproj) if settings.mmproj else None
    problems = gguf_problems(kinds, mmproj)
    details = {"architecture": kinds.architecture,
               "projector_type": kinds.projector_type if mmproj else None}
    if problems:
        return Check("gguf", "fail", "; ".join(problems) + f"; {instead(kinds)}", details)
    if mmproj is None:
        return Check("gguf", "ok", f"architecture {kinds.architecture} supported by this "
                     "build; text only (no projector)", details)
    return Check("gguf", "ok", f"architecture {kinds.architecture}, projector "
                 f"{kinds.projector_type}: both supported by this build", details)


def check_template(kinds: GgufKinds, settings: Settings) -> Check:
    from server.engine.prompt import ChatTemplate, PromptError
    from server.engine.templates import TemplateConfigError, template_for

    try:
        chosen = template_for(settings, {"tokenizer.chat_template": kinds.chat_template,
                                         "general.architecture": kinds.architecture})
        ChatTemplate(chosen.template, bos_token="", eos_token="", media_marker="<__media__>")
    except (PromptError, TemplateConfigError) as exc:
        return Check("template", "fail", str(exc))
    origin = f"{chosen.name} ({chosen.reason})"
    return Check("template", "ok", f"{origin}; stops at "
                 f"{', '.join(repr(s) for s in chosen.stops) or 'end-of-generation tokens'}",
                 {"origin": origin, **chosen.meta(), "template": chosen.template})


def _registry_entry(settings: Settings, registry: Path) -> RegistryEntry | None:
    """The registry entry whose two file names are the configured files' names."""
    from server.registry import load_registry

    if not registry.is_file():
        return None
    names = {role: Path(path).name for role, path in _files(settings)}
    for entry in load_registry(registry).values():
        if {role: spec.name for role, spec in entry.file_list()} == names:
            return entry
    return None


def _files(settings: Settings) -> list[tuple[str, Path]]:
    files = [("model", Path(settings.model))]
    return [*files, ("mmproj", Path(settings.mmproj))] if settings.mmproj else files
