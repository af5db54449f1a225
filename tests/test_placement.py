"""Placement read back from llama.cpp's log: the parser and the warnings it leads to.

The log lines are llama.cpp's own format strings (quoted from the llama.cpp vendored in
llama-cpp-python 0.3.36, file and line given) filled in with printf semantics, so a CUDA
load log is tested here without a GPU. The CPU lines are the ones this machine's build logs.
"""

from __future__ import annotations

import pytest

from server.engine.build_info import parse_system_info
from server.engine.placement import Placement, placement_warnings, read_placement

# src/llama-model.cpp:1594/1599 (LLAMA_LOG_DEBUG), 1916, 1919, 1924, 1930
LAYER = "load_tensors: layer %3d assigned to device %s, is_swa = %d"
OFFLOADING_OUTPUT = "%s: offloading output layer to GPU"
OFFLOADING = "%s: offloading %d repeating layers to GPU"
OFFLOADED = "%s: offloaded %d/%d layers to GPU"
MODEL_BUFFER = "%s: %12s model buffer size = %8.2f MiB"
# src/llama-context.cpp:314, and 553 / 550 in resolve_fused_ops (probe name "Flash Attention")
FLASH = "%s: flash_attn            = %s"
FUSED_ON = "%s: %s enabled"
FUSED_OFF = "%s: %s not supported, set to disabled"
# src/llama-kv-cache.cpp:291, 301
KV_BUFFER = "%s: %10s KV buffer size = %8.2f MiB"
KV_SIZE = ("%s: size = %7.2f MiB (%6u cells, %3d layers, %2u/%u seqs), K (%s): %7.2f MiB, "
           "V (%s): %7.2f MiB")
# tools/mtmd/clip.cpp:202, 207, 3773, 3786
CLIP_GPU = "%s: CLIP using %s backend"
CLIP_CPU = "%s: CLIP using CPU backend"
CLIP_FLASH = "%s: flash attention is %s"
CLIP_UNSUPPORTED = "%s: WARNING: the CLIP graph uses unsupported operators by the backend"


def cuda_log(n_layer: int = 32, on_gpu: int = 33, clip: str = "CUDA0",
             flash: str = "enabled") -> list[str]:
    """A 7B model on one CUDA GPU, as llama.cpp logs it with n_gpu_layers = `on_gpu`."""
    first_gpu = n_layer + 1 - on_gpu
    lines = [LAYER % (il, "CUDA0" if il >= first_gpu else "CPU", 0)
             for il in range(n_layer + 1)]
    lines += [OFFLOADING_OUTPUT % "load_tensors", OFFLOADING % ("load_tensors", on_gpu - 1),
              OFFLOADED % ("load_tensors", on_gpu, n_layer + 1),
              MODEL_BUFFER % ("load_tensors", "CUDA0", 3891.24),
              MODEL_BUFFER % ("load_tensors", "CPU_Mapped", 70.31),
              FLASH % ("llama_context", "auto"),
              KV_BUFFER % ("llama_kv_cache", "CUDA0", 1024.0),
              KV_SIZE % ("llama_kv_cache", 1024.0, 4096, 32, 4, 1, "q8_0", 512.0, "q8_0", 512.0),
              (FUSED_ON if flash == "enabled" else FUSED_OFF)
              % ("resolve_fused_ops", "Flash Attention"),
              CLIP_GPU % ("clip_ctx", clip) if clip != "CPU" else CLIP_CPU % "clip_ctx"]
    return lines


# What this machine's CPU build logged loading the demo model (2 layers, n_gpu_layers -1).
CPU_LOG = [
    "load_tensors: loading model tensors, this can take a while... (load_mode = mmap)",
    "load_tensors: layer   0 assigned to device CPU, is_swa = 0",
    "load_tensors: layer   1 assigned to device CPU, is_swa = 0",
    "load_tensors: layer   2 assigned to device CPU, is_swa = 0",
    "load_tensors:   CPU_Mapped model buffer size =     1.16 MiB",
    "llama_context: flash_attn            = auto",
    "llama_context:        CPU  output buffer size =     0.03 MiB",
    "llama_kv_cache:        CPU KV buffer size =     1.00 MiB",
    "llama_kv_cache: size =    1.00 MiB (  4096 cells,   2 layers,  4/1 seqs), "
    "K (f16):    0.50 MiB, V (f16):    0.50 MiB",
    "resolve_fused_ops: Flash Attention enabled",
    "sched_reserve:        CPU compute buffer size =     5.01 MiB",
    "clip_ctx: CLIP using CPU backend",
    "load_tensors: loaded 41 tensors from /tmp/demo/demo-llava-mmproj.gguf",
]


def warnings_for(p: Placement, *, gpu_build: bool = True, n_gpu_layers: int = -1,
                 mmproj_use_gpu: bool = True, flash_attn: str = "auto") -> list[str]:
    return placement_warnings(p, gpu_build=gpu_build, n_gpu_layers=n_gpu_layers,
                              mmproj_use_gpu=mmproj_use_gpu, flash_attn=flash_attn, n_layers=32)


def test_cpu_build_log_reads_back_cpu_for_both_parts() -> None:
    p = read_placement(CPU_LOG)
    assert (p.llm_device, p.gpu_layers, p.offloadable_layers) == ("CPU", 0, 3)
    assert p.projector_device == "CPU" and not p.projector_on_gpu and not p.llm_on_gpu
    assert p.weights_mib == {"CPU_Mapped": 1.16}
    assert (p.kv_device, p.kv_type_k, p.kv_type_v, p.flash_attn) == ("CPU", "f16", "f16",
                                                                     "enabled")
    assert p.describe() == ("LLM layers run on CPU; vision encoder runs on CPU; flash "
                            "attention enabled; KV cache f16/f16 on CPU")


def test_full_cuda_offload() -> None:
    p = read_placement(cuda_log())
    assert (p.llm_device, p.gpu_layers, p.offloadable_layers) == ("CUDA0", 33, 33)
    assert p.projector_device == "CUDA0" and p.projector_on_gpu
    assert (p.kv_device, p.kv_type_k, p.kv_type_v) == ("CUDA0", "q8_0", "q8_0")
    assert p.weights_mib == {"CUDA0": 3891.24, "CPU_Mapped": 70.31}
    assert p.describe_llm() == "CUDA0 (33/33 layers)"
    assert warnings_for(p) == []


def test_summary_line_counts_when_the_per_layer_lines_are_missing() -> None:
    # The per-layer lines are debug level; the summary line alone still gives the count.
    p = read_placement([line for line in cuda_log(on_gpu=20) if "assigned" not in line])
    assert (p.llm_device, p.gpu_layers, p.offloadable_layers) == ("CUDA0", 20, 33)


def test_partial_offload_is_read_per_layer() -> None:
    p = read_placement(cuda_log(on_gpu=10))
    assert (p.gpu_layers, p.offloadable_layers) == (10, 33)
    (warning,) = warnings_for(p, n_gpu_layers=-1)
    assert "asked for 33 GPU layers but llama.cpp offloaded 10/33" in warning
    assert "GPU memory" in warning
    assert warnings_for(p, n_gpu_layers=10) == []  # asked for 10, got 10


def test_gpu_layers_on_a_cpu_build_names_the_rebuild() -> None:
    (warning,) = warnings_for(read_placement(CPU_LOG), gpu_build=False, n_gpu_layers=-1)
    assert warning.startswith("n_gpu_layers is -1 but this llama.cpp build has no GPU backend")
    assert 'CMAKE_ARGS="-DGGML_CUDA=on"' in warning and "--no-cache-dir" in warning
    assert warnings_for(read_placement(CPU_LOG), gpu_build=False, n_gpu_layers=0) == []


def test_encoder_on_cpu_while_llm_on_gpu() -> None:
    p = read_placement(cuda_log(clip="CPU"))
    (off,) = warnings_for(p, mmproj_use_gpu=False)
    assert "mmproj_use_gpu is false" in off and "set mmproj_use_gpu: true" in off
    (failed,) = warnings_for(p, mmproj_use_gpu=True)
    assert "mmproj_use_gpu is on but mtmd gave the vision encoder the CPU backend" in failed


def test_encoder_ops_falling_back_to_cpu() -> None:
    lines = [*cuda_log(), CLIP_UNSUPPORTED % "warmup", CLIP_FLASH % ("warmup", "disabled")]
    p = read_placement(lines)
    assert p.projector_cpu_fallback and p.projector_flash_attn == "disabled"
    (warning,) = warnings_for(p)
    assert "not supported by CUDA0 and run on the CPU" in warning


def test_gpu_build_left_on_the_cpu() -> None:
    p = read_placement(cuda_log(on_gpu=0))
    assert p.llm_device == "CPU"
    assert any("n_gpu_layers is 0" in w and "n_gpu_layers: -1" in w
               for w in warnings_for(p, n_gpu_layers=0))


def test_flash_attention_requested_but_refused() -> None:
    p = read_placement(cuda_log(flash="disabled"))
    assert p.flash_attn == "disabled"
    assert any("flash_attn is on but llama.cpp disabled it" in w
               for w in warnings_for(p, flash_attn="on"))
    # on/off are logged as requested and not resolved again
    assert read_placement([FLASH % ("llama_context", "disabled")]).flash_attn == "disabled"


def test_unknown_lines_leave_fields_unknown() -> None:
    p = read_placement(["something else entirely"])
    assert (p.projector_device, p.flash_attn, p.kv_type_k) == (None, None, None)
    assert "vision encoder runs on unknown" in p.describe()


@pytest.mark.parametrize(("text", "expected"), [
    ("CPU : SSE3 = 1 | AVX2 = 1 | OPENMP = 1 | REPACK = 1 | ",
     {"CPU": {"SSE3": "1", "AVX2": "1", "OPENMP": "1", "REPACK": "1"}}),
    # a CUDA backend registered first (features: ggml/src/ggml-cuda/ggml-cuda.cu:5735-5759)
    ("CUDA : ARCHS = 800,860,890,900 | USE_GRAPHS = 1 | CPU : AVX2 = 1 | ",
     {"CUDA": {"ARCHS": "800,860,890,900", "USE_GRAPHS": "1"}, "CPU": {"AVX2": "1"}}),
])
def test_system_info(text: str, expected: dict[str, dict[str, str]]) -> None:
    assert parse_system_info(text) == expected
