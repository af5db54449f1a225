"""A Qwen2-VL-style pair: the qwen2vl text GGUF (M-RoPE) and the qwen2vl_merger mmproj.

Not a served family of its own: it proves that the generic image sizing (server.engine.
projector) fits a projector type no other code knows about. Keys and tensors follow
llama.cpp's src/models/qwen2vl.cpp and tools/mtmd/models/qwen2vl.cpp (clip.cpp loads mm.0 /
mm.2 with biases for PROJECTOR_TYPE_QWEN2VL; the graph adds the q/k/v biases
unconditionally and asserts there is no patch bias): a two-frame patch conv, LayerNorm
blocks, a GELU MLP, post_ln (the merger's ln_q), then 2x2 patches concatenated into mm.0,
GELU, mm.2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFValueType, GGUFWriter, LlamaFileType

from .bpe_vocab import BpeVocab
from .config import TextConfig
from .gguf_file import add_f32_array, write_gguf_atomically
from .glm_config import GlmVisionConfig
from .weights import linear, normal, ones, zeros

EOS = "<|im_end|>"  # ends every ChatML turn
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", EOS, "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|vision_pad|>",
)
DESCRIPTION = "random weights: generates random text"
LOGIT_GAIN = 3.0
# Qwen2-VL's processor normalisation (OpenAI CLIP's constants).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class QwenModelConfig:
    file_prefix: str
    name: str
    text: TextConfig
    vision: GlmVisionConfig  # the same ViT shape: 14 px patches, 2x2 merge

    @property
    def rope_sections(self) -> tuple[int, int, int, int]:
        """Qwen2-VL splits head_dim / 2 rotary pairs as [16, 24, 24] of 64."""
        pairs = self.text.head_dim // 2
        t = pairs // 4
        h = (pairs - t) // 2
        return t, h, pairs - t - h, 0


QWEN_CONFIGS: dict[str, QwenModelConfig] = {
    "tiny": QwenModelConfig(
        file_prefix="demo", name="vlserve-demo-qwen2vl-tiny",
        text=TextConfig(n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128,
                        n_ctx_train=4096, f16=False, rms_eps=1e-6, rope_freq_base=1e6),
        vision=GlmVisionConfig(image_size=336, patch_size=14, n_embd=64, n_layer=2, n_head=4,
                               n_ff=128, merger_n_ff=256, f16=False, eps=1e-6),
    ),
    "bench": QwenModelConfig(
        file_prefix="bench", name="vlserve-demo-qwen2vl-bench",
        text=TextConfig(n_embd=768, n_layer=12, n_head=12, n_head_kv=4, n_ff=2048,
                        n_ctx_train=4096, f16=True, rms_eps=1e-6, rope_freq_base=1e6),
        vision=GlmVisionConfig(image_size=336, patch_size=14, n_embd=768, n_layer=12,
                               n_head=12, n_ff=3072, merger_n_ff=3072, f16=True, eps=1e-6),
    ),
}


def write_qwen_text_model(path: Path, cfg: QwenModelConfig, vocab: BpeVocab,
                          rng: np.random.Generator, chat_template: str) -> None:
    text, arch = cfg.text, "qwen2vl"

    def fill(writer: GGUFWriter) -> None:
        writer.add_string("general.name", cfg.name)
        writer.add_string("general.description", DESCRIPTION)
        ftype = LlamaFileType.MOSTLY_F16 if text.f16 else LlamaFileType.ALL_F32
        writer.add_uint32("general.file_type", int(ftype))
        for key, value in {"context_length": text.n_ctx_train, "embedding_length": text.n_embd,
                           "block_count": text.n_layer, "feed_forward_length": text.n_ff,
                           "attention.head_count": text.n_head,
                           "attention.head_count_kv": text.n_head_kv,
                           "rope.dimension_count": text.head_dim}.items():
            writer.add_uint32(f"{arch}.{key}", value)
        writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", text.rms_eps)
        writer.add_float32(f"{arch}.rope.freq_base", text.rope_freq_base)
        writer.add_key_value(f"{arch}.rope.dimension_sections", list(cfg.rope_sections),
                             GGUFValueType.ARRAY, GGUFValueType.INT32)
        writer.add_string("tokenizer.ggml.model", "gpt2")
        writer.add_string("tokenizer.ggml.pre", "qwen2")
        writer.add_key_value("tokenizer.ggml.tokens", list(vocab.tokens), GGUFValueType.ARRAY,
                             GGUFValueType.STRING)
        writer.add_key_value("tokenizer.ggml.token_type", list(vocab.token_types),
                             GGUFValueType.ARRAY, GGUFValueType.INT32)
        writer.add_key_value("tokenizer.ggml.merges", list(vocab.merges), GGUFValueType.ARRAY,
                             GGUFValueType.STRING)
        writer.add_uint32("tokenizer.ggml.eos_token_id", vocab.id_of(EOS))
        writer.add_uint32("tokenizer.ggml.bos_token_id", vocab.id_of("<|endoftext|>"))
        writer.add_bool("tokenizer.ggml.add_bos_token", False)
        writer.add_string("tokenizer.chat_template", chat_template)
        _add_text_tensors(writer, text, len(vocab), rng)

    write_gguf_atomically(path, arch, fill)


def _add_text_tensors(writer: GGUFWriter, text: TextConfig, n_vocab: int,
                      rng: np.random.Generator) -> None:
    f16, d, n_kv = text.f16, text.n_embd, text.head_dim * text.n_head_kv
    writer.add_tensor("token_embd.weight", normal(rng, (n_vocab, d), 1.0, f16))
    writer.add_tensor("output_norm.weight", ones(d))
    writer.add_tensor("output.weight", linear(rng, n_vocab, d, f16, gain=LOGIT_GAIN))
    for i in range(text.n_layer):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", ones(d))
        for proj, rows in (("attn_q", d), ("attn_k", n_kv), ("attn_v", n_kv)):
            writer.add_tensor(f"{blk}.{proj}.weight", linear(rng, rows, d, f16))
            writer.add_tensor(f"{blk}.{proj}.bias", zeros(rows))
        writer.add_tensor(f"{blk}.attn_output.weight", linear(rng, d, d, f16))
        writer.add_tensor(f"{blk}.ffn_norm.weight", ones(d))
        writer.add_tensor(f"{blk}.ffn_gate.weight", linear(rng, text.n_ff, d, f16))
        writer.add_tensor(f"{blk}.ffn_up.weight", linear(rng, text.n_ff, d, f16))
        writer.add_tensor(f"{blk}.ffn_down.weight", linear(rng, d, text.n_ff, f16))


def write_qwen_projector(path: Path, cfg: GlmVisionConfig, text_n_embd: int,
                         rng: np.random.Generator, *, name: str) -> None:
    f16, d, p = cfg.f16, cfg.n_embd, cfg.patch_size
    if d // cfg.n_head % 4:
        raise ValueError("vision head size must split into 4 M-RoPE sections")

    def fill(writer: GGUFWriter) -> None:
        writer.add_string("general.name", name)
        writer.add_string("general.description", "random weights: image embeddings carry "
                          "no meaning")
        ftype = LlamaFileType.MOSTLY_F16 if f16 else LlamaFileType.ALL_F32
        writer.add_uint32("general.file_type", int(ftype))
        writer.add_bool("clip.has_vision_encoder", True)
        writer.add_string("clip.projector_type", "qwen2vl_merger")
        for key, value in {"image_size": cfg.image_size, "patch_size": p,
                           "embedding_length": d, "feed_forward_length": cfg.n_ff,
                           "projection_dim": text_n_embd, "block_count": cfg.n_layer,
                           "attention.head_count": cfg.n_head,
                           "spatial_merge_size": cfg.spatial_merge}.items():
            writer.add_uint32(f"clip.vision.{key}", value)
        writer.add_float32("clip.vision.attention.layer_norm_epsilon", cfg.eps)
        add_f32_array(writer, "clip.vision.image_mean", IMAGE_MEAN)
        add_f32_array(writer, "clip.vision.image_std", IMAGE_STD)
        _add_vision_tensors(writer, cfg, text_n_embd, rng)

    write_gguf_atomically(path, "clip", fill)


def _add_vision_tensors(writer: GGUFWriter, cfg: GlmVisionConfig, text_n_embd: int,
                        rng: np.random.Generator) -> None:
    f16, d, p = cfg.f16, cfg.n_embd, cfg.patch_size
    scale = 0.5 / np.sqrt(3 * p * p)  # two frames of the temporal patch, summed
    writer.add_tensor("v.patch_embd.weight", normal(rng, (d, 3, p, p), scale, f16))
    writer.add_tensor("v.patch_embd.weight.1", normal(rng, (d, 3, p, p), scale, f16))
    for i in range(cfg.n_layer):
        blk = f"v.blk.{i}"
        for norm in ("ln1", "ln2"):
            writer.add_tensor(f"{blk}.{norm}.weight", ones(d))
            writer.add_tensor(f"{blk}.{norm}.bias", zeros(d))
        for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"{blk}.{proj}.weight", linear(rng, d, d, f16))
            writer.add_tensor(f"{blk}.{proj}.bias", zeros(d))
        writer.add_tensor(f"{blk}.ffn_up.weight", linear(rng, cfg.n_ff, d, f16))
        writer.add_tensor(f"{blk}.ffn_up.bias", zeros(cfg.n_ff))
        writer.add_tensor(f"{blk}.ffn_down.weight", linear(rng, d, cfg.n_ff, f16))
        writer.add_tensor(f"{blk}.ffn_down.bias", zeros(d))
    writer.add_tensor("v.post_ln.weight", ones(d))
    writer.add_tensor("v.post_ln.bias", zeros(d))
    merged = d * cfg.spatial_merge ** 2
    writer.add_tensor("mm.0.weight", linear(rng, cfg.merger_n_ff, merged, f16))
    writer.add_tensor("mm.0.bias", zeros(cfg.merger_n_ff))
    writer.add_tensor("mm.2.weight", linear(rng, text_n_embd, cfg.merger_n_ff, f16))
    writer.add_tensor("mm.2.bias", zeros(text_n_embd))
