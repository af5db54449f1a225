"""The LLaVA-1.5-style mmproj GGUF: a CLIP ViT encoder plus a 2-layer MLP projector ("mlp").

Key and tensor names follow llama.cpp's tools/mtmd/clip-impl.h (KEY_*, TN_*). clip.cpp reads
values with untyped getters (gguf_get_val_u32 and friends), which abort the whole process on a
type mismatch instead of raising, so every value below is written with its exact GGUF type.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from .config import VisionConfig
from .gguf_file import add_vision_header, write_gguf_atomically
from .weights import linear, normal, ones, zeros

ARCH = "clip"
DESCRIPTION = "random weights: image embeddings carry no meaning"

# OpenAI CLIP preprocessing constants, as shipped in real LLaVA-1.5 mmproj files.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def write_clip_projector(
    path: Path, cfg: VisionConfig, text_n_embd: int, rng: np.random.Generator, *, name: str
) -> None:
    def fill(writer: GGUFWriter) -> None:
        _add_hparams(writer, cfg, text_n_embd, name)
        _add_tensors(writer, cfg, text_n_embd, rng)

    write_gguf_atomically(path, ARCH, fill)


def _add_hparams(writer: GGUFWriter, cfg: VisionConfig, text_n_embd: int, name: str) -> None:
    # The MLP projector takes its output size from mm.2; projection_dim is there for the loader.
    add_vision_header(writer, cfg, name=name, description=DESCRIPTION, projector_type="mlp",
                      text_n_embd=text_n_embd, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    # CLIP uses quick-GELU, which is clip.cpp's default when use_gelu is false.
    writer.add_bool("clip.use_gelu", False)
    # No clip.vision.feature_layer and no image_grid_pinpoints: plain LLaVA-1.5, i.e. a fixed
    # square resize and the penultimate encoder layer's output (clip.cpp skips the last block).


def _add_tensors(
    writer: GGUFWriter, cfg: VisionConfig, text_n_embd: int, rng: np.random.Generator
) -> None:
    f16 = cfg.f16
    n_embd = cfg.n_embd
    if cfg.n_ff == n_embd:
        # clip.cpp would mistake the FFN for a legacy file with swapped up/down names.
        raise ValueError("vision n_ff must differ from n_embd")
    patch_fan_in = 3 * cfg.patch_size * cfg.patch_size
    # Conv kernel in PyTorch layout (out, in, kh, kw) = ggml ne [kw, kh, in, out].
    writer.add_tensor(
        "v.patch_embd.weight",
        normal(rng, (n_embd, 3, cfg.patch_size, cfg.patch_size), 1.0 / np.sqrt(patch_fan_in), f16),
    )
    # The class token adds one position; clip.cpp drops it again before the projector.
    writer.add_tensor("v.class_embd", normal(rng, (n_embd,), 1.0, False))
    writer.add_tensor(
        "v.position_embd.weight", normal(rng, (cfg.n_patches + 1, n_embd), 0.1, False)
    )
    writer.add_tensor("v.pre_ln.weight", ones(n_embd))
    writer.add_tensor("v.pre_ln.bias", zeros(n_embd))
    for i in range(cfg.n_layer):
        blk = f"v.blk.{i}"
        writer.add_tensor(f"{blk}.ln1.weight", ones(n_embd))
        writer.add_tensor(f"{blk}.ln1.bias", zeros(n_embd))
        for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"{blk}.{proj}.weight", linear(rng, n_embd, n_embd, f16))
            writer.add_tensor(f"{blk}.{proj}.bias", zeros(n_embd))
        writer.add_tensor(f"{blk}.ln2.weight", ones(n_embd))
        writer.add_tensor(f"{blk}.ln2.bias", zeros(n_embd))
        # Correct names (up: n_embd -> n_ff); see the n_ff check above.
        writer.add_tensor(f"{blk}.ffn_up.weight", linear(rng, cfg.n_ff, n_embd, f16))
        writer.add_tensor(f"{blk}.ffn_up.bias", zeros(cfg.n_ff))
        writer.add_tensor(f"{blk}.ffn_down.weight", linear(rng, n_embd, cfg.n_ff, f16))
        writer.add_tensor(f"{blk}.ffn_down.bias", zeros(n_embd))
    # LLaVA projector: mm.0 (vision -> text width), GELU, mm.2. The graph adds both biases
    # unconditionally, so they must exist.
    writer.add_tensor("mm.0.weight", linear(rng, text_n_embd, n_embd, f16))
    writer.add_tensor("mm.0.bias", zeros(text_n_embd))
    writer.add_tensor("mm.2.weight", linear(rng, text_n_embd, text_n_embd, f16))
    writer.add_tensor("mm.2.bias", zeros(text_n_embd))
