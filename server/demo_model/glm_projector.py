"""The glm4v mmproj GGUF: GLM-4.1V's ViT, its 2x2 conv patch merger and MLP projector.

Tensors are the ones tools/mtmd/clip.cpp loads for PROJECTOR_TYPE_GLM4V and its graph
(tools/mtmd/models/glm4v.cpp) asserts or uses: both frames of the temporal patch conv
(v.patch_embd.weight and .weight.1) and its bias, the post-conv RMS norm (v.norm_embd),
learned positions (v.position_embd, resized bicubically to each image), RMS-normed blocks
with a SwiGLU MLP, v.post_ln, then mm.patch_merger (conv), mm.model.fc, mm.post_norm
(LayerNorm) and the mm.gate/up/down MLP. No class token: the graph asserts there is none.
Keys have their exact GGUF types (clip.cpp's getters abort on a mismatch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from .gguf_file import add_vision_header, write_gguf_atomically
from .glm_config import GlmVisionConfig
from .weights import linear, normal, ones, zeros

ARCH = "clip"
DESCRIPTION = "random weights: image embeddings carry no meaning"

# OpenAI CLIP normalisation, as GLM-4.1V's preprocessor_config.json has it.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def write_glm_projector(path: Path, cfg: GlmVisionConfig, text_n_embd: int,
                        rng: np.random.Generator, *, name: str) -> None:
    def fill(writer: GGUFWriter) -> None:
        _add_hparams(writer, cfg, text_n_embd, name)
        _add_tensors(writer, cfg, text_n_embd, rng)

    write_gguf_atomically(path, ARCH, fill)


def _add_hparams(writer: GGUFWriter, cfg: GlmVisionConfig, text_n_embd: int, name: str
                 ) -> None:
    add_vision_header(writer, cfg, name=name, description=DESCRIPTION, projector_type="glm4v",
                      text_n_embd=text_n_embd, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    writer.add_uint32("clip.vision.spatial_merge_size", cfg.spatial_merge)
    writer.add_bool("clip.use_silu", True)  # GLM-4.1V's vision hidden_act (the MLPs' gate)


def _add_tensors(writer: GGUFWriter, cfg: GlmVisionConfig, text_n_embd: int,
                 rng: np.random.Generator) -> None:
    f16, d, p, m = cfg.f16, cfg.n_embd, cfg.patch_size, cfg.spatial_merge
    if d // cfg.n_head % 4:
        raise ValueError("vision head size must split into 4 M-RoPE sections")
    # Conv kernels in PyTorch layout (out, in, kh, kw); the two frames of the temporal
    # patch are summed, so each gets half the usual scale.
    scale = 0.5 / np.sqrt(3 * p * p)
    writer.add_tensor("v.patch_embd.weight", normal(rng, (d, 3, p, p), scale, f16))
    writer.add_tensor("v.patch_embd.weight.1", normal(rng, (d, 3, p, p), scale, f16))
    writer.add_tensor("v.patch_embd.bias", zeros(d))
    writer.add_tensor("v.norm_embd.weight", ones(d))
    writer.add_tensor("v.position_embd.weight", normal(rng, (cfg.n_positions, d), 0.1, False))
    for i in range(cfg.n_layer):
        blk = f"v.blk.{i}"
        writer.add_tensor(f"{blk}.ln1.weight", ones(d))
        for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"{blk}.{proj}.weight", linear(rng, d, d, f16))
        writer.add_tensor(f"{blk}.ln2.weight", ones(d))
        writer.add_tensor(f"{blk}.ffn_gate.weight", linear(rng, cfg.n_ff, d, f16))
        writer.add_tensor(f"{blk}.ffn_up.weight", linear(rng, cfg.n_ff, d, f16))
        writer.add_tensor(f"{blk}.ffn_down.weight", linear(rng, d, cfg.n_ff, f16))
    writer.add_tensor("v.post_ln.weight", ones(d))
    # Merger: a merge x merge conv from the ViT width to the text width, then fc, LayerNorm,
    # GELU and a SwiGLU MLP (gate/up -> merger_n_ff -> down).
    t, h = text_n_embd, cfg.merger_n_ff
    writer.add_tensor("mm.patch_merger.weight", normal(rng, (t, d, m, m), 1 / np.sqrt(d * m * m),
                                                       f16))
    writer.add_tensor("mm.patch_merger.bias", zeros(t))
    writer.add_tensor("mm.model.fc.weight", linear(rng, t, t, f16))
    writer.add_tensor("mm.post_norm.weight", ones(t))
    writer.add_tensor("mm.post_norm.bias", zeros(t))
    writer.add_tensor("mm.gate.weight", linear(rng, h, t, f16))
    writer.add_tensor("mm.up.weight", linear(rng, h, t, f16))
    writer.add_tensor("mm.down.weight", linear(rng, t, h, f16))
