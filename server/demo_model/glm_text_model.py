"""The glm4-architecture text GGUF (GLM-4.1V's language model), byte-level BPE vocab, template.

Keys and tensors follow llama.cpp's src/models/glm4.cpp and src/llama-arch.cpp, laid out as
conversion/glm.py writes Glm4vForConditionalGeneration: separate q/k/v with biases, post
norms after attention and MLP (post_attention_norm, post_ffw_norm), gate and up fused in
ffn_up (2 x n_ff rows), half-head rotary, and M-RoPE sections, without which llama.cpp
refuses image embeddings for this architecture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFValueType, GGUFWriter, LlamaFileType

from .bpe_vocab import BpeVocab
from .gguf_file import write_gguf_atomically
from .glm_config import GlmModelConfig
from .weights import linear, normal, ones, zeros

ARCH = "glm4"
DESCRIPTION = "random weights: generates random text"

EOS = "<|endoftext|>"  # GLM's end of text (also its unk); no BOS: the template writes [gMASK]<sop>
EOT = "<|user|>"  # a model that opens the user's turn has finished its own (conversion/glm.py)
SPECIAL_TOKENS: tuple[str, ...] = (
    EOS, "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
    "<|begin_of_video|>", "<|end_of_video|>", "<|image|>",
)

# Output-layer gain, as in the other demo models: greedy decoding must depend on the context.
LOGIT_GAIN = 3.0


def write_glm_text_model(path: Path, cfg: GlmModelConfig, vocab: BpeVocab,
                         rng: np.random.Generator, chat_template: str) -> None:
    def fill(writer: GGUFWriter) -> None:
        _add_hparams(writer, cfg, len(vocab))
        _add_tokenizer(writer, vocab, chat_template)
        _add_tensors(writer, cfg, len(vocab), rng)

    write_gguf_atomically(path, ARCH, fill)


def _add_hparams(writer: GGUFWriter, cfg: GlmModelConfig, n_vocab: int) -> None:
    text = cfg.text
    writer.add_string("general.name", cfg.name)
    writer.add_string("general.description", DESCRIPTION)
    ftype = LlamaFileType.MOSTLY_F16 if text.f16 else LlamaFileType.ALL_F32
    writer.add_uint32("general.file_type", int(ftype))
    u32 = {"context_length": text.n_ctx_train, "embedding_length": text.n_embd,
           "block_count": text.n_layer, "feed_forward_length": text.n_ff,
           "vocab_size": n_vocab, "attention.head_count": text.n_head,
           "attention.head_count_kv": text.n_head_kv, "rope.dimension_count": cfg.rope_dims}
    for key, value in u32.items():
        writer.add_uint32(f"{ARCH}.{key}", value)
    writer.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", text.rms_eps)
    writer.add_float32(f"{ARCH}.rope.freq_base", text.rope_freq_base)
    writer.add_key_value(f"{ARCH}.rope.dimension_sections", list(cfg.rope_sections),
                         GGUFValueType.ARRAY, GGUFValueType.INT32)


def _add_tokenizer(writer: GGUFWriter, vocab: BpeVocab, chat_template: str) -> None:
    writer.add_string("tokenizer.ggml.model", "gpt2")  # byte-level BPE
    writer.add_string("tokenizer.ggml.pre", "glm4")  # GLM-4's pre-tokenizer regex
    writer.add_key_value("tokenizer.ggml.tokens", list(vocab.tokens), GGUFValueType.ARRAY,
                         GGUFValueType.STRING)
    writer.add_key_value("tokenizer.ggml.token_type", list(vocab.token_types),
                         GGUFValueType.ARRAY, GGUFValueType.INT32)
    writer.add_key_value("tokenizer.ggml.merges", list(vocab.merges), GGUFValueType.ARRAY,
                         GGUFValueType.STRING)
    writer.add_uint32("tokenizer.ggml.eos_token_id", vocab.id_of(EOS))
    writer.add_uint32("tokenizer.ggml.eot_token_id", vocab.id_of(EOT))
    writer.add_uint32("tokenizer.ggml.unknown_token_id", vocab.id_of(EOS))
    writer.add_uint32("tokenizer.ggml.bos_token_id", vocab.id_of(EOS))  # as converted; unused
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    writer.add_bool("tokenizer.ggml.add_eos_token", False)
    writer.add_string("tokenizer.chat_template", chat_template)


def _add_tensors(writer: GGUFWriter, cfg: GlmModelConfig, n_vocab: int,
                 rng: np.random.Generator) -> None:
    text = cfg.text
    f16, d = text.f16, text.n_embd
    n_kv = text.head_dim * text.n_head_kv
    # Numpy shapes are the reverse of the loader's ggml `ne`.
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
        writer.add_tensor(f"{blk}.post_attention_norm.weight", ones(d))
        writer.add_tensor(f"{blk}.ffn_norm.weight", ones(d))
        writer.add_tensor(f"{blk}.ffn_up.weight", linear(rng, 2 * text.n_ff, d, f16))
        writer.add_tensor(f"{blk}.ffn_down.weight", linear(rng, d, text.n_ff, f16))
        writer.add_tensor(f"{blk}.post_ffw_norm.weight", ones(d))
