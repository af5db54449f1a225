"""Plain-text tokenization for models without a vision projector (no mtmd context)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp

from server.engine.mtmd import MediaError, PromptChunk, TokenizedPrompt
from server.engine.textparts import Part, Special
from server.engine.types import ImageInput


def tokenize_text(vocab: llama_cpp.llama_vocab_p, text: str, *, add_special: bool = True,
                  parse_special: bool = True) -> list[int]:
    """Token ids of `text`; add_special: with the vocab's BOS, as mtmd_tokenize does."""
    raw = text.encode("utf-8")
    capacity = len(raw) + 8  # a token covers at least one byte, plus BOS/EOS
    buf = (llama_cpp.llama_token * capacity)()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, capacity, add_special,
                                 parse_special)
    if n < 0:  # cannot happen with this capacity, but the API allows it
        capacity = -n
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, capacity, add_special,
                                     parse_special)
    return list(buf[:n])


def token_piece(vocab: llama_cpp.llama_vocab_p, token: int, *, special: bool) -> bytes:
    """The bytes of one token's text; special: control tokens as their text (else none)."""
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:n]


def detokenize(vocab: llama_cpp.llama_vocab_p, tokens: Sequence[int], *,
               special: bool = True) -> str:
    """The text of `tokens` as the vocab joins them (its own rules for word-start spaces);
    special: control tokens written out (so that tokenizing it again reads them back)."""
    ids = (llama_cpp.llama_token * len(tokens))(*tokens)
    capacity = 16 * len(tokens) + 16
    for _ in range(2):
        buf = ctypes.create_string_buffer(capacity)
        n = llama_cpp.llama_detokenize(vocab, ids, len(tokens), buf, capacity, False, special)
        if n >= 0:
            return buf.raw[:n].decode("utf-8", errors="replace")
        capacity = -n
    raise RuntimeError("llama_detokenize kept asking for more room")


def part_tokens(vocab: llama_cpp.llama_vocab_p, part: str | Special) -> list[int]:
    """One text part alone, as mtmd_tokenize_from_parts tokenizes it: special parsing only
    for the template's own special tokens, no BOS/EOS."""
    if isinstance(part, Special):
        return tokenize_text(vocab, part.text, add_special=False, parse_special=True)
    return tokenize_text(vocab, part, add_special=False, parse_special=False)


def text_prompt(vocab: llama_cpp.llama_vocab_p, parts: Sequence[Part]) -> TokenizedPrompt:
    """The prompt's parts as one text chunk, tokenized as mtmd_tokenize_from_parts does
    (each part alone, special parsing only for the template's own special tokens, the
    vocab's BOS/EOS around the whole), shaped like mtmd's output for the scheduler."""
    tokens: list[int] = []
    for part in parts:
        if isinstance(part, ImageInput):
            raise MediaError("this model has no vision projector; it reads text only")
        tokens += part_tokens(vocab, part)
    if llama_cpp.llama_vocab_get_add_bos(vocab):
        tokens.insert(0, llama_cpp.llama_vocab_bos(vocab))
    if llama_cpp.llama_vocab_get_add_eos(vocab):
        tokens.append(llama_cpp.llama_vocab_eos(vocab))
    return TokenizedPrompt(None, [PromptChunk(tokens=tuple(tokens), image=None,
                                              n_tokens=len(tokens), handle=0)])


def single_control_token(vocab: llama_cpp.llama_vocab_p, marker: str,
                         pieces: list[bytes]) -> int | None:
    """The token id if `marker` is one special token (e.g. <start_of_turn>), else None.

    Such tokens render as no text at all (pieces are detokenized without specials), so
    only their id can tell that the model wrote them."""
    ids = tokenize_text(vocab, marker, add_special=False)
    if len(ids) == 1 and 0 <= ids[0] < len(pieces) and pieces[ids[0]] == b"":
        return ids[0]
    return None
