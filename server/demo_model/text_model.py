"""The llama-architecture text GGUF: metadata, SPM vocab, chat template and random weights.

Key and tensor names follow llama.cpp's src/llama-arch.cpp (LLM_KV_*, LLM_TENSOR_*); the loader
checks value types, so integers are UINT32, epsilons FLOAT32 and flags BOOL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFValueType, GGUFWriter, LlamaFileType

from .chat_template import LLAVA_CHAT_TEMPLATE
from .config import TextConfig
from .gguf_file import write_gguf_atomically
from .vocab import BOS_ID, EOS_ID, UNK_ID, Vocab
from .weights import linear, normal, ones

ARCH = "llama"
DESCRIPTION = "random weights: generates random text"

# Output-layer gain: logits get a std of about this many units, spread enough that greedy
# decoding depends on the context instead of always picking the same token.
LOGIT_GAIN = 3.0


def write_text_model(
    path: Path, cfg: TextConfig, vocab: Vocab, rng: np.random.Generator, *, name: str
) -> None:
    def fill(writer: GGUFWriter) -> None:
        _add_hparams(writer, cfg, name)
        _add_tokenizer(writer, vocab)
        _add_tensors(writer, cfg, len(vocab), rng)

    write_gguf_atomically(path, ARCH, fill)


def _add_hparams(writer: GGUFWriter, cfg: TextConfig, name: str) -> None:
    writer.add_string("general.name", name)
    writer.add_string("general.description", DESCRIPTION)
    ftype = LlamaFileType.MOSTLY_F16 if cfg.f16 else LlamaFileType.ALL_F32
    writer.add_uint32("general.file_type", int(ftype))
    writer.add_uint32(f"{ARCH}.context_length", cfg.n_ctx_train)
    writer.add_uint32(f"{ARCH}.embedding_length", cfg.n_embd)
    writer.add_uint32(f"{ARCH}.block_count", cfg.n_layer)
    writer.add_uint32(f"{ARCH}.feed_forward_length", cfg.n_ff)
    writer.add_uint32(f"{ARCH}.attention.head_count", cfg.n_head)
    writer.add_uint32(f"{ARCH}.attention.head_count_kv", cfg.n_head_kv)
    writer.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", cfg.rms_eps)
    # llama.cpp rejects a llama model whose rope dimension differs from the head size.
    writer.add_uint32(f"{ARCH}.rope.dimension_count", cfg.head_dim)
    writer.add_float32(f"{ARCH}.rope.freq_base", cfg.rope_freq_base)


def _add_tokenizer(writer: GGUFWriter, vocab: Vocab) -> None:
    # "llama" selects the SPM tokenizer; tokenizer.ggml.pre is only read for BPE vocabs.
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_key_value(
        "tokenizer.ggml.tokens", list(vocab.tokens), GGUFValueType.ARRAY, GGUFValueType.STRING
    )
    writer.add_key_value(
        "tokenizer.ggml.scores", list(vocab.scores), GGUFValueType.ARRAY, GGUFValueType.FLOAT32
    )
    writer.add_key_value(
        "tokenizer.ggml.token_type",
        list(vocab.token_types),
        GGUFValueType.ARRAY,
        GGUFValueType.INT32,
    )
    writer.add_uint32("tokenizer.ggml.bos_token_id", BOS_ID)
    writer.add_uint32("tokenizer.ggml.eos_token_id", EOS_ID)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", UNK_ID)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_bool("tokenizer.ggml.add_eos_token", False)
    writer.add_string("tokenizer.chat_template", LLAVA_CHAT_TEMPLATE)


def _add_tensors(
    writer: GGUFWriter, cfg: TextConfig, n_vocab: int, rng: np.random.Generator
) -> None:
    f16 = cfg.f16
    n_embd_kv = cfg.head_dim * cfg.n_head_kv
    # Unit-variance embeddings: the residual stream starts at O(1) like in a trained model.
    writer.add_tensor("token_embd.weight", normal(rng, (n_vocab, cfg.n_embd), 1.0, f16))
    writer.add_tensor("output_norm.weight", ones(cfg.n_embd))
    writer.add_tensor("output.weight", linear(rng, n_vocab, cfg.n_embd, f16, gain=LOGIT_GAIN))
    for i in range(cfg.n_layer):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", ones(cfg.n_embd))
        writer.add_tensor(f"{blk}.attn_q.weight", linear(rng, cfg.n_embd, cfg.n_embd, f16))
        writer.add_tensor(f"{blk}.attn_k.weight", linear(rng, n_embd_kv, cfg.n_embd, f16))
        writer.add_tensor(f"{blk}.attn_v.weight", linear(rng, n_embd_kv, cfg.n_embd, f16))
        writer.add_tensor(f"{blk}.attn_output.weight", linear(rng, cfg.n_embd, cfg.n_embd, f16))
        writer.add_tensor(f"{blk}.ffn_norm.weight", ones(cfg.n_embd))
        writer.add_tensor(f"{blk}.ffn_gate.weight", linear(rng, cfg.n_ff, cfg.n_embd, f16))
        writer.add_tensor(f"{blk}.ffn_up.weight", linear(rng, cfg.n_ff, cfg.n_embd, f16))
        writer.add_tensor(f"{blk}.ffn_down.weight", linear(rng, cfg.n_embd, cfg.n_ff, f16))
