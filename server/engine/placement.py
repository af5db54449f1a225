"""Where llama.cpp really put the model, read back from its own load log.

llama.cpp 0.3.36 has no C API that says which device holds each layer, which backend mtmd
gave the vision encoder, or how flash attention and the KV types were resolved: llama.h has
no getters for them, and the staging header llama-ext.h's llama_model_get_device and
llama_get_memory_breakdown, like mtmd_get_memory_usage, are C++ symbols that ctypes cannot
call (and the first lists the devices available, not the ones used). The load log says all
of it. (The build's backends and devices do have an API: build_info.py uses it.)

The lines below are quoted from the llama.cpp vendored in llama-cpp-python 0.3.36
(src/llama-model.cpp, src/llama-context.cpp, src/llama-kv-cache.cpp, tools/mtmd/clip.cpp),
each matched by its own pattern so a line that changes in a later release is missed (and
reported as unknown), never misread.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

# load_tensors: layer   0 assigned to device CUDA0, is_swa = 0      (debug level, every build;
# one line per repeating layer, then one for the output layer)
_LAYER = re.compile(r"load_tensors: layer\s+(\d+) assigned to device ([^,\s]+),")
# load_tensors: offloaded 33/33 layers to GPU        (only in builds with a GPU backend)
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
# load_tensors:   CPU_Mapped model buffer size =    12.34 MiB
_MODEL_BUFFER = re.compile(r"(\S+) model buffer size =\s*([\d.]+) MiB")
# llama_kv_cache:        CPU KV buffer size =     8.00 MiB
_KV_BUFFER = re.compile(r"(\S+) KV buffer size =\s*([\d.]+) MiB")
# llama_kv_cache: size = 8.00 MiB (1024 cells, 2 layers, 4/1 seqs), K (f16): 4.00 MiB, V (f16): ...
_KV_TYPES = re.compile(r"K \((\w+)\):.*V \((\w+)\):")
# llama_context: flash_attn            = auto        (the requested mode)
_FLASH_REQUESTED = re.compile(r"llama_context: flash_attn\s+= (\w+)")
# resolve_fused_ops: Flash Attention enabled / ... Flash Attention not supported, set to disabled
_FLASH_RESOLVED = re.compile(r"Flash Attention (enabled|not supported, set to disabled)")
# clip_ctx: CLIP using CUDA0 backend / clip_ctx: CLIP using CPU backend
_CLIP_BACKEND = re.compile(r"CLIP using (\S+) backend")
# warmup: flash attention is enabled   (clip.cpp, on the first encode: vlserve's warm-up)
_CLIP_FLASH = re.compile(r"warmup: flash attention is (enabled|disabled)")
# warmup: WARNING: the CLIP graph uses unsupported operators by the backend
_CLIP_UNSUPPORTED = re.compile(r"CLIP graph uses unsupported operators")


def is_host_buffer(name: str) -> bool:
    """CPU buffers (CPU, CPU_Mapped, CPU_REPACK) and pinned host memory (CUDA_Host)."""
    return name.startswith("CPU") or name.endswith("_Host")


@dataclass
class Placement:
    """What llama.cpp did with the model; None where the log did not say."""

    llm_device: str = "CPU"  # the devices holding offloaded layers, or CPU
    gpu_layers: int = 0  # layers offloaded, output layer included (llama.cpp's count)
    offloadable_layers: int | None = None  # n_layer + 1 (the output layer)
    weights_mib: dict[str, float] = field(default_factory=dict)  # model buffer → size
    kv_device: str = "CPU"
    kv_type_k: str | None = None
    kv_type_v: str | None = None
    flash_attn: str | None = None  # "enabled" / "disabled", as resolved
    projector_device: str | None = None  # the backend mtmd's vision encoder uses
    projector_flash_attn: str | None = None  # known once an image was encoded
    projector_cpu_fallback: bool = False  # some encoder ops unsupported by its GPU backend

    @property
    def llm_on_gpu(self) -> bool:
        return self.llm_device != "CPU"

    @property
    def projector_on_gpu(self) -> bool:
        return self.projector_device not in (None, "CPU")

    def describe_llm(self) -> str:
        if not self.llm_on_gpu:
            return "CPU"
        total = f"/{self.offloadable_layers}" if self.offloadable_layers else ""
        return f"{self.llm_device} ({self.gpu_layers}{total} layers)"

    def describe(self, *, vision: bool = True) -> str:
        """One line for logs and `vlserve doctor` (`vision`: the model has a projector)."""
        flash = self.flash_attn or "unknown"
        encoder = f"vision encoder runs on {self.projector_device or 'unknown'}" if vision \
            else "text only (no vision encoder)"
        return (f"LLM layers run on {self.describe_llm()}; {encoder}; flash attention {flash}; "
                f"KV cache {self.kv_type_k}/{self.kv_type_v} on {self.kv_device}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_placement(lines: Iterable[str]) -> Placement:
    """Parse llama.cpp's load (and first-encode) log lines; later lines win."""
    p = Placement()
    flash_requested: str | None = None
    kv_devices: list[str] = []
    layers: dict[int, str] = {}
    for line in lines:
        if m := _LAYER.search(line):
            layers[int(m[1])] = m[2]
        elif m := _OFFLOADED.search(line):
            p.gpu_layers, p.offloadable_layers = int(m[1]), int(m[2])
        elif m := _MODEL_BUFFER.search(line):
            p.weights_mib[m[1]] = float(m[2])
        elif m := _KV_BUFFER.search(line):
            kv_devices.append(m[1])
        elif m := _KV_TYPES.search(line):
            p.kv_type_k, p.kv_type_v = m[1], m[2]
        elif m := _FLASH_REQUESTED.search(line):
            flash_requested = m[1]
        elif m := _FLASH_RESOLVED.search(line):
            p.flash_attn = "enabled" if m[1] == "enabled" else "disabled"
        elif m := _CLIP_BACKEND.search(line):
            p.projector_device = m[1]
        elif m := _CLIP_FLASH.search(line):
            p.projector_flash_attn = m[1]
        elif _CLIP_UNSUPPORTED.search(line):
            p.projector_cpu_fallback = True
    if p.flash_attn is None and flash_requested in ("enabled", "disabled"):
        p.flash_attn = flash_requested  # on/off are logged as such and not resolved again
    if layers:  # the per-layer lines are exact; the summary line is the fallback
        on_gpu = [device for device in layers.values() if device != "CPU"]
        p.gpu_layers, p.offloadable_layers = len(on_gpu), len(layers)
        p.llm_device = ",".join(dict.fromkeys(on_gpu)) or "CPU"
    else:
        p.llm_device = _devices(p.weights_mib)
    p.kv_device = _devices(kv_devices)
    return p


def placement_warnings(p: Placement, *, gpu_build: bool, n_gpu_layers: int,
                       mmproj_use_gpu: bool, flash_attn: str, n_layers: int) -> list[str]:
    """What the operator asked for and did not get, each with the setting or fix."""
    out: list[str] = []
    asked = n_layers + 1 if n_gpu_layers < 0 else n_gpu_layers
    if not gpu_build:
        if n_gpu_layers != 0:
            out.append(
                f"n_gpu_layers is {n_gpu_layers} but this llama.cpp build has no GPU backend, "
                "so every layer runs on the CPU: rebuild llama-cpp-python with CUDA, "
                f"{rebuild_hint()}")
        return out
    if n_gpu_layers == 0:
        out.append("this llama.cpp build supports a GPU but n_gpu_layers is 0: the model runs "
                   "on the CPU (set n_gpu_layers: -1 to offload every layer)")
    elif (p.gpu_layers < min(asked, p.offloadable_layers or asked)
          or _devices(p.weights_mib) == "CPU"):
        out.append(f"asked for {asked} GPU layers but llama.cpp offloaded {p.gpu_layers}"
                   f"/{p.offloadable_layers} and holds weights on {p.llm_device}: check "
                   "GPU memory (nvidia-smi) and CUDA_VISIBLE_DEVICES")
    if p.projector_device is not None and not p.projector_on_gpu:
        if not mmproj_use_gpu:
            if p.llm_on_gpu:
                out.append("the LLM runs on the GPU but the vision encoder on the CPU because "
                           "mmproj_use_gpu is false: image encodes take seconds instead of "
                           "milliseconds (set mmproj_use_gpu: true)")
        else:
            out.append("mmproj_use_gpu is on but mtmd gave the vision encoder the CPU backend: "
                       "no usable GPU device (check CUDA_VISIBLE_DEVICES and GPU memory)")
    if p.projector_cpu_fallback:
        out.append(f"some vision encoder operations are not supported by "
                   f"{p.projector_device} and run on the CPU (llama.cpp's warning above lists "
                   "them): image encodes are slower than they should be")
    if flash_attn == "on" and p.flash_attn == "disabled":
        out.append("flash_attn is on but llama.cpp disabled it for this model and device")
    return out


def rebuild_hint() -> str:
    """The command that replaces a CPU-only llama-cpp-python with a CUDA build."""
    try:
        pin = "==" + version("llama-cpp-python")
    except PackageNotFoundError:
        pin = ""
    # --no-cache-dir: pip's wheel cache would hand back the CPU build it compiled before.
    return ('CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
            f"llama-cpp-python{pin}")


def _devices(buffers: Iterable[str]) -> str:
    names = dict.fromkeys(b.removesuffix("_Mapped") for b in buffers if not is_host_buffer(b))
    return ",".join(names) or "CPU"
