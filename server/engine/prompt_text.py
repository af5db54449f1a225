"""A raw prompt's tokens as text that joins to what `echo` repeats (text completions'
`logprobs.tokens` and `text_offset` with `echo`: OpenAI's promise is that the tokens join
to the text, each at its offset).

A vocab that puts a space before the text it tokenizes (SentencePiece's add_space_prefix:
Llama's, not Gemma's) reads "Hello" as " Hello"; that space is the tokenizer's, not the
client's, so it is dropped from the token's text, as HF's decode drops it.
"""

from __future__ import annotations

from collections.abc import Sequence

import llama_cpp

from server.engine.model import LoadedModel
from server.engine.tokens import token_piece


def prompt_texts(model: LoadedModel, tokens: Sequence[int], *, written: bool) -> list[bytes]:
    """Each token's text. written: the tokens of the client's text prompt, whose every
    character they spell: a special token shows the text the client wrote (none for the
    BOS/EOS the tokenizer added), and each stretch of text after one starts without the
    tokenizer's space (llama.cpp adds one there, as at the start). Else token ids, written
    out as the model reads them: special tokens show no text (as in generated text), and
    only the first text loses the space."""
    vocab = model.vocab
    bos = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else -1
    eos = llama_cpp.llama_vocab_eos(vocab) if llama_cpp.llama_vocab_get_add_eos(vocab) else -1
    last = len(tokens) - 1
    texts: list[bytes] = []
    text_starts = True  # where the tokenizer put its space
    for i, token in enumerate(tokens):
        piece = model.pieces[token]
        if not piece:  # a special token (a control token's text is none)
            added = (i == 0 and token == bos) or (i == last and token == eos)
            if written and not added:
                piece = token_piece(vocab, token, special=True)
                text_starts = True
        elif text_starts:
            if model.space_prefix and piece.startswith(b" "):
                piece = piece[1:]
            text_starts = False
        texts.append(piece)
    return texts
