"""The youtuvl mmproj GGUF: a SigLIP-style ViT (2-D RoPE, window attention) + 2x2 patch merger.

Keys and tensors are the ones tools/mtmd/clip.cpp requires for PROJECTOR_TYPE_YOUTUVL (and
conversion/youtuvl.py writes). clip.cpp's typed getters abort the process on a type mismatch,
so every value has its exact GGUF type: UINT32 sizes, FLOAT32 epsilons, BOOL flags, and the
full-attention layer list as an INT32 array.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFValueType, GGUFWriter

from .gguf_file import add_vision_header, write_gguf_atomically
from .weights import linear, ones, zeros
from .youtu_config import YoutuVisionConfig

ARCH = "clip"
DESCRIPTION = "random weights: image embeddings carry no meaning"

# SigLIP normalisation: pixels to [-1, 1].
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def write_youtu_projector(
    path: Path, cfg: YoutuVisionConfig, text_n_embd: int, rng: np.random.Generator, *, name: str
) -> None:
    def fill(writer: GGUFWriter) -> None:
        _add_hparams(writer, cfg, text_n_embd, name)
        _add_tensors(writer, cfg, text_n_embd, rng)

    write_gguf_atomically(path, ARCH, fill)


def _add_hparams(
    writer: GGUFWriter, cfg: YoutuVisionConfig, text_n_embd: int, name: str
) -> None:
    add_vision_header(writer, cfg, name=name, description=DESCRIPTION, projector_type="youtuvl",
                      text_n_embd=text_n_embd, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    writer.add_bool("clip.use_gelu", True)  # gelu_pytorch_tanh
    writer.add_uint32("clip.vision.spatial_merge_size", cfg.spatial_merge)
    # Both required for youtuvl: the window side in pixels, and the layers that attend to the
    # whole image (all others attend within their window).
    writer.add_uint32("clip.vision.window_size", cfg.window_size)
    writer.add_key_value(
        "clip.vision.wa_layer_indexes",
        list(cfg.full_attention_layers),
        GGUFValueType.ARRAY,
        sub_type=GGUFValueType.INT32,
    )
    # No image_min/max_pixels: clip.cpp ignores them for youtuvl (it fixes 1..62500 tokens
    # unless mtmd is given image_min/max_tokens), and the converter writes none either.


def _add_tensors(
    writer: GGUFWriter, cfg: YoutuVisionConfig, text_n_embd: int, rng: np.random.Generator
) -> None:
    f16, d = cfg.f16, cfg.n_embd
    patch_in = 3 * cfg.patch_size * cfg.patch_size
    # A linear patch embedding over flattened 16x16x3 patches (numpy order: out x in).
    writer.add_tensor("v.patch_embd.weight", linear(rng, d, patch_in, f16))
    writer.add_tensor("v.patch_embd.bias", zeros(d))
    for i in range(cfg.n_layer):
        blk = f"v.blk.{i}"
        writer.add_tensor(f"{blk}.ln1.weight", ones(d))
        writer.add_tensor(f"{blk}.ln1.bias", zeros(d))
        # The graph adds the q/k/v biases unconditionally, so they must exist.
        for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"{blk}.{proj}.weight", linear(rng, d, d, f16))
            writer.add_tensor(f"{blk}.{proj}.bias", zeros(d))
        writer.add_tensor(f"{blk}.ln2.weight", ones(d))
        writer.add_tensor(f"{blk}.ln2.bias", zeros(d))
        writer.add_tensor(f"{blk}.ffn_up.weight", linear(rng, cfg.n_ff, d, f16))
        writer.add_tensor(f"{blk}.ffn_up.bias", zeros(cfg.n_ff))
        writer.add_tensor(f"{blk}.ffn_down.weight", linear(rng, d, cfg.n_ff, f16))
        writer.add_tensor(f"{blk}.ffn_down.bias", zeros(d))
    writer.add_tensor("v.post_ln.weight", ones(d))
    writer.add_tensor("v.post_ln.bias", zeros(d))
    # Patch merger: RMS norm, then 2x2 neighbouring patches concatenated -> MLP -> text width.
    merged = d * cfg.spatial_merge**2
    writer.add_tensor("mm.input_norm.weight", ones(d))
    writer.add_tensor("mm.0.weight", linear(rng, cfg.merger_n_ff, merged, f16))
    writer.add_tensor("mm.0.bias", zeros(cfg.merger_n_ff))
    writer.add_tensor("mm.2.weight", linear(rng, text_n_embd, cfg.merger_n_ff, f16))
    writer.add_tensor("mm.2.bias", zeros(text_n_embd))
