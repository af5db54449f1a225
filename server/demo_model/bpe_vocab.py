"""A small byte-level BPE vocabulary ("gpt2" tokenizer model) with a family's special tokens.

Byte-level BPE maps every byte to one printable character (GPT-2's bytes-to-unicode table), so
the 256 single-byte tokens alone cover any UTF-8 text: llama.cpp starts each pre-tokenized word
from those characters and applies merges by rank. Each merge result is itself a token, and
every word in the list gets the chain of merges that builds it ("Ġ t" → "Ġt", "Ġt h" → "Ġth",
"Ġth e" → "Ġthe"), so common words become one token and everything else splits into pieces
or bytes, never into <unk>. With the "youtu" pre-tokenizer llama.cpp also takes any word that
is a token as a whole (ignore_merges).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from gguf import TokenType

from .vocab import CAPITALISED, SUFFIXES, WORDS

BOS = "<|begin_of_text|>"  # also opens every chat turn in Youtu-VL's template
EOS = "<|end_of_text|>"  # ends every turn; the end-of-generation token
VISION_START = "<|vision_start|>"  # mtmd wraps each youtuvl image in these two
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"  # the HF processor's per-embedding placeholder; unused by mtmd
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, VISION_START, VISION_END, IMAGE_PAD)

# Words of the chat template itself, so prompts tokenize compactly.
TEMPLATE_WORDS: tuple[str, ...] = ("system", "user", "assistant", "helpful", "You")


@dataclass(frozen=True)
class BpeVocab:
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]  # "left right", best (applied first) first

    def __len__(self) -> int:
        return len(self.tokens)

    def id_of(self, token: str) -> int:
        return self.tokens.index(token)


@cache
def byte_to_char() -> dict[int, str]:
    """GPT-2's table: printable Latin-1 bytes map to themselves, the rest to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def encode_bytes(text: str) -> str:
    """Text as the byte-level characters its tokens are spelled in ("Ġ" for a space)."""
    table = byte_to_char()
    return "".join(table[b] for b in text.encode("utf-8"))


def _words() -> list[str]:
    """Pre-tokenizer words to merge, most frequent first: " the" before "the"."""
    words: list[str] = ["\n\n"]
    words += [" " + w for w in (*WORDS, *TEMPLATE_WORDS)]
    words += [" " + w for w in CAPITALISED]
    words += [*WORDS, *CAPITALISED, *TEMPLATE_WORDS, *SUFFIXES]
    return list(dict.fromkeys(words))


def build_bpe_vocab(special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> BpeVocab:
    """The merges for the word list, then `special_tokens` (Youtu-VL's by default) as
    control tokens at the end."""
    table = byte_to_char()
    tokens: list[str] = [table[b] for b in range(256)]
    known = set(tokens)
    merges: list[str] = []
    for word in _words():
        piece = encode_bytes(word)
        for end in range(2, len(piece) + 1):
            left, right, merged = piece[: end - 1], piece[end - 1], piece[:end]
            if merged not in known:  # the first (best-ranked) way to build a token wins
                known.add(merged)
                tokens.append(merged)
                merges.append(f"{left} {right}")
    types = [TokenType.NORMAL] * len(tokens)
    tokens += special_tokens
    types += [TokenType.CONTROL] * len(special_tokens)
    return BpeVocab(tuple(tokens), tuple(int(t) for t in types), tuple(merges))
