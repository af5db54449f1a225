"""What this llama-cpp-python build can run on: its backends and the devices they see.

Read through ggml's backend registry (the API llama.cpp itself uses to pick devices), not
from settings: a wheel compiled without CUDA simply has no CUDA backend registered.
"""

from __future__ import annotations

import ctypes
from dataclasses import asdict, dataclass, field
from typing import Any

import llama_cpp

from server.engine import llama_log

# enum ggml_backend_dev_type in ggml/include/ggml-backend.h (0.3.36's vendored llama.cpp).
_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


@dataclass(frozen=True)
class Device:
    name: str  # e.g. "CPU", "CUDA0"
    description: str  # e.g. "NVIDIA H200"
    type: str  # cpu / gpu / igpu / accel / meta
    memory_total_mib: int
    memory_free_mib: int


@dataclass(frozen=True)
class BuildInfo:
    llama_cpp_python: str
    llama_cpp: str  # llama_version() of the vendored llama.cpp
    backends: list[str]  # registered ggml backends, e.g. ["CUDA", "CPU"]
    devices: list[Device]
    gpu_offload: bool  # llama_supports_gpu_offload(): some GPU/iGPU/RPC device exists
    features: dict[str, dict[str, str]] = field(default_factory=dict)  # backend → features

    @property
    def gpu_devices(self) -> list[Device]:
        return [d for d in self.devices if d.type in ("gpu", "igpu")]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_build_info() -> BuildInfo:
    llama_log.install()  # a CUDA build logs its device scan here: through logging, not stderr
    llama_cpp.llama_backend_init()  # registers (or, in GGML_BACKEND_DL builds, loads) backends
    lib = _ggml()
    backends = [_text(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)))
                for i in range(lib.ggml_backend_reg_count())]
    devices = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        devices.append(Device(
            name=_text(lib.ggml_backend_dev_name(dev)),
            description=_text(lib.ggml_backend_dev_description(dev)),
            type=_DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "unknown"),
            memory_total_mib=total.value >> 20, memory_free_mib=free.value >> 20))
    return BuildInfo(
        llama_cpp_python=llama_cpp.__version__,
        llama_cpp=_text(llama_cpp.llama_version()),
        backends=backends,
        devices=devices,
        gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
        features=parse_system_info(llama_cpp.llama_print_system_info().decode(errors="replace")),
    )


def parse_system_info(text: str) -> dict[str, dict[str, str]]:
    """llama_print_system_info(): "CPU : SSE3 = 1 | AVX2 = 1 | CUDA : ARCHS = 900 | ..."."""
    out: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for item in (part.strip() for part in text.split("|")):
        if " : " in item:  # a new backend's first feature
            name, item = (s.strip() for s in item.split(" : ", 1))
            current = out.setdefault(name, {})
        if current is not None and " = " in item:
            key, value = (s.strip() for s in item.split(" = ", 1))
            current[key] = value
    return out


_lib: ctypes.CDLL | None = None


def _ggml() -> ctypes.CDLL:
    """libggml as llama-cpp-python loaded it, with the registry functions typed."""
    global _lib
    if _lib is None:
        from llama_cpp._ggml import libggml as lib

        ptr, size, text = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
        for name, args, result in (
            ("ggml_backend_reg_count", [], size),
            ("ggml_backend_reg_get", [size], ptr),
            ("ggml_backend_reg_name", [ptr], text),
            ("ggml_backend_dev_count", [], size),
            ("ggml_backend_dev_get", [size], ptr),
            ("ggml_backend_dev_name", [ptr], text),
            ("ggml_backend_dev_description", [ptr], text),
            ("ggml_backend_dev_type", [ptr], ctypes.c_int),
            ("ggml_backend_dev_memory", [ptr, ctypes.POINTER(size), ctypes.POINTER(size)],
             None),
        ):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, result
        _lib = lib
    return _lib


def _text(raw: bytes | None) -> str:
    return (raw or b"").decode("utf-8", errors="replace")
