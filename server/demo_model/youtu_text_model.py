"""The deepseek2-architecture text GGUF (Youtu-LLM: dense MLA), byte-level BPE vocab, template.

Keys and tensor names follow llama.cpp's src/llama-arch.cpp and the deepseek2 loader
(src/models/deepseek2.cpp), laid out the way conversion/deepseek.py writes Youtu-VL: KV heads
1 (MLA runs as MQA over the compressed latent), key/value lengths of that latent, the MLA head
sizes separately, every block dense (leading_dense_block_count = block_count, no experts, but
the expert keys the loader insists on), kv_b split into k_b and v_b.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFValueType, GGUFWriter, LlamaFileType

from .bpe_vocab import BOS, EOS, BpeVocab
from .chat_template import YOUTU_VL_CHAT_TEMPLATE
from .gguf_file import write_gguf_atomically
from .weights import linear, normal, ones
from .youtu_config import MlaTextConfig

ARCH = "deepseek2"
DESCRIPTION = "random weights: generates random text"

# Output-layer gain: logits get a std of about this many units, spread enough that greedy
# decoding depends on the context instead of always picking the same token.
LOGIT_GAIN = 3.0


def write_youtu_text_model(
    path: Path, cfg: MlaTextConfig, vocab: BpeVocab, rng: np.random.Generator, *, name: str
) -> None:
    def fill(writer: GGUFWriter) -> None:
        _add_hparams(writer, cfg, len(vocab), name)
        _add_tokenizer(writer, vocab)
        _add_tensors(writer, cfg, len(vocab), rng)

    write_gguf_atomically(path, ARCH, fill)


def _add_hparams(writer: GGUFWriter, cfg: MlaTextConfig, n_vocab: int, name: str) -> None:
    writer.add_string("general.name", name)
    writer.add_string("general.description", DESCRIPTION)
    ftype = LlamaFileType.MOSTLY_F16 if cfg.f16 else LlamaFileType.ALL_F32
    writer.add_uint32("general.file_type", int(ftype))
    u32 = {
        "context_length": cfg.n_ctx_train,
        "embedding_length": cfg.n_embd,
        "block_count": cfg.n_layer,
        "feed_forward_length": cfg.n_ff,
        "vocab_size": n_vocab,
        "attention.head_count": cfg.n_head,
        "attention.head_count_kv": 1,
        # Required unless the block count marks a "lite" model (26 or 27 blocks).
        "attention.q_lora_rank": cfg.q_lora_rank,
        "attention.kv_lora_rank": cfg.kv_lora_rank,
        # What the KV cache holds per token: the latent (+ the rope part for keys).
        "attention.key_length": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        "attention.value_length": cfg.kv_lora_rank,
        # The per-head sizes after decompression; their presence turns on the MLA path.
        "attention.key_length_mla": cfg.qk_head_dim,
        "attention.value_length_mla": cfg.v_head_dim,
        "rope.dimension_count": cfg.qk_rope_head_dim,
        "leading_dense_block_count": cfg.n_layer,  # all blocks dense: no expert tensors needed
        "expert_feed_forward_length": cfg.n_ff,  # read unconditionally by the loader
        "expert_shared_count": 0,  # likewise
    }
    for key, value in u32.items():
        writer.add_uint32(f"{ARCH}.{key}", value)
    writer.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", cfg.rms_eps)
    writer.add_float32(f"{ARCH}.rope.freq_base", cfg.rope_freq_base)


def _add_tokenizer(writer: GGUFWriter, vocab: BpeVocab) -> None:
    writer.add_string("tokenizer.ggml.model", "gpt2")  # byte-level BPE
    writer.add_string("tokenizer.ggml.pre", "youtu")  # Youtu-LLM's pre-tokenizer regex
    writer.add_key_value(
        "tokenizer.ggml.tokens", list(vocab.tokens), GGUFValueType.ARRAY, GGUFValueType.STRING
    )
    writer.add_key_value(
        "tokenizer.ggml.token_type",
        list(vocab.token_types),
        GGUFValueType.ARRAY,
        GGUFValueType.INT32,
    )
    writer.add_key_value(
        "tokenizer.ggml.merges", list(vocab.merges), GGUFValueType.ARRAY, GGUFValueType.STRING
    )
    writer.add_uint32("tokenizer.ggml.bos_token_id", vocab.id_of(BOS))
    writer.add_uint32("tokenizer.ggml.eos_token_id", vocab.id_of(EOS))
    # The template writes every <|begin_of_text|> itself, the first one included.
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    writer.add_bool("tokenizer.ggml.add_eos_token", False)
    writer.add_string("tokenizer.chat_template", YOUTU_VL_CHAT_TEMPLATE)


def _add_tensors(
    writer: GGUFWriter, cfg: MlaTextConfig, n_vocab: int, rng: np.random.Generator
) -> None:
    f16 = cfg.f16
    d, n_head = cfg.n_embd, cfg.n_head
    # Numpy shapes are the reverse of the loader's ggml `ne`.
    writer.add_tensor("token_embd.weight", normal(rng, (n_vocab, d), 1.0, f16))
    writer.add_tensor("output_norm.weight", ones(d))
    # Youtu ties output to token_embd (the loader falls back to it when output.weight is
    # absent), but with random weights the residual stream stays close to the last input
    # embedding, so tied logits would make greedy decoding repeat the last token forever.
    writer.add_tensor("output.weight", linear(rng, n_vocab, d, f16, gain=LOGIT_GAIN))
    for i in range(cfg.n_layer):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", ones(d))
        writer.add_tensor(f"{blk}.attn_q_a.weight", linear(rng, cfg.q_lora_rank, d, f16))
        writer.add_tensor(f"{blk}.attn_q_a_norm.weight", ones(cfg.q_lora_rank))
        writer.add_tensor(
            f"{blk}.attn_q_b.weight", linear(rng, n_head * cfg.qk_head_dim, cfg.q_lora_rank, f16)
        )
        writer.add_tensor(
            f"{blk}.attn_kv_a_mqa.weight",
            linear(rng, cfg.kv_lora_rank + cfg.qk_rope_head_dim, d, f16),
        )
        writer.add_tensor(f"{blk}.attn_kv_a_norm.weight", ones(cfg.kv_lora_rank))
        # kv_b split per head: k_b is stored transposed (nope x latent), v_b as (latent x v).
        # Always F32: on CPUs with AMX, llama.cpp puts F16 weights in its AMX buffer, whose
        # matmul refuses these 3-D weights' non-contiguous inputs, and no other backend may
        # take the op: the context aborts (GGML_ASSERT in ggml_backend_sched) at creation.
        scale = 1.0 / np.sqrt(cfg.kv_lora_rank)
        writer.add_tensor(
            f"{blk}.attn_k_b.weight",
            normal(rng, (n_head, cfg.kv_lora_rank, cfg.qk_nope_head_dim), scale, False),
        )
        writer.add_tensor(
            f"{blk}.attn_v_b.weight",
            normal(rng, (n_head, cfg.v_head_dim, cfg.kv_lora_rank), scale, False),
        )
        writer.add_tensor(
            f"{blk}.attn_output.weight", linear(rng, d, n_head * cfg.v_head_dim, f16)
        )
        writer.add_tensor(f"{blk}.ffn_norm.weight", ones(d))
        writer.add_tensor(f"{blk}.ffn_gate.weight", linear(rng, cfg.n_ff, d, f16))
        writer.add_tensor(f"{blk}.ffn_up.weight", linear(rng, cfg.n_ff, d, f16))
        writer.add_tensor(f"{blk}.ffn_down.weight", linear(rng, d, cfg.n_ff, f16))
