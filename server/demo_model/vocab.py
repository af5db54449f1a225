"""A small SentencePiece-style ("llama" / SPM) vocabulary with byte fallback.

llama.cpp's SPM tokenizer starts from single characters and repeatedly merges the adjacent pair
whose concatenation is a vocab entry with the best score. A word piece can therefore only ever be
produced if every intermediate merge is in the vocab too, so each word is added together with all
of its prefixes ("▁t", "▁th", "▁the"). Anything not covered (emoji, CJK, control characters)
falls back to the 256 `<0xNN>` byte tokens, so no text ever maps to `<unk>`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import TokenType

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2

SPACE = "\u2581"  # "▁": SentencePiece's visible space

# Common English words plus some image vocabulary, most frequent first (earlier = better score).
WORDS: tuple[str, ...] = tuple(
    """
    the of and to a in is it you that he was for on are with as his they be at one have this
    from or had by not word but what some we can out other were all there when up use your how
    said an each she which do their time if will way about many then them write would like so
    these her long make thing see him two has look more day could go come did number sound no
    most people my over know water than call first who may down side been now find any new work
    part take get place made live where after back little only round man year came show every
    good me give our under name very through just form sentence great think say help low line
    differ turn cause much mean before move right boy old too same tell does set three want air
    well also play small end put home read hand port large spell add even land here must big
    high such follow act why ask men change went light kind off need house picture try us again
    animal point mother world near build self earth father head stand own page should country
    found answer school grow study still learn plant cover food sun four between state keep eye
    never last let thought city tree cross farm hard start might story saw far sea draw left
    late run while press close night real life few north open seem together next white children
    begin got walk example ease paper group always music those both mark often letter until mile
    river car feet care second book carry took science eat room friend began idea fish mountain
    stop once base hear horse cut sure watch color face wood main enough plain girl usual young
    ready above ever red list though feel talk bird soon body dog family direct pose leave song
    measure door product black short numeral class wind question happen complete ship area half
    rock order fire south problem piece told knew pass since top whole king space heard best
    hour better true during hundred five remember step early hold west ground interest reach
    fast verb sing listen six table travel less morning ten simple several toward war lay
    against pattern slow center love person money serve appear road map rain rule govern pull
    cold notice voice unit power town fine certain fly fall lead cry dark machine note wait plan
    figure star box noun field rest correct able pound done beauty drive stood contain front
    teach week final gave green oh quick develop ocean warm free minute strong special mind
    behind clear tail produce fact street inch multiply nothing course stay wheel full force
    blue object decide surface deep moon island foot system busy test record boat common gold
    possible plane dry wonder laugh thousand ago ran check game shape yes hot miss brought heat
    snow bed bring sit perhaps fill east weight language among image photo describe shows
    showing there sky background foreground person people cat sitting standing wearing shirt
    building window street grass yellow orange purple brown gray pink bright colorful hello
    please thanks question assistant user system answer text model random demo test
    """.split()
)

# Capitalised forms for words that commonly start a sentence or a chat turn.
CAPITALISED: tuple[str, ...] = tuple(
    """
    The This That There It In A An I You What How Why Who Where When Is Are Describe Hello Yes
    No USER ASSISTANT
    """.split()
)

# Common endings, so unknown inflections still split into a few pieces instead of letters.
SUFFIXES: tuple[str, ...] = tuple("s es ed ing ly er est tion ment ness".split())


@dataclass(frozen=True)
class Vocab:
    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    token_types: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.tokens)


def _prefixes(piece: str) -> list[str]:
    # "▁the" -> ["▁t", "▁th", "▁the"]: the merge path SPM needs to ever reach "▁the".
    start = 2 if piece.startswith(SPACE) else 1
    return [piece[:i] for i in range(start, len(piece) + 1)]


def _normal_pieces() -> list[str]:
    pieces: list[str] = []
    # Printable ASCII except the space itself, which SPM always rewrites to "▁" first.
    pieces += [chr(c) for c in range(0x21, 0x7F)]
    pieces.append(SPACE)
    pieces += [SPACE + c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    for word in (*WORDS, *CAPITALISED):
        pieces += _prefixes(SPACE + word)
    for suffix in SUFFIXES:
        pieces += _prefixes(suffix)
    # De-duplicate, keeping the first (best-scored) occurrence.
    return list(dict.fromkeys(pieces))


def build_vocab() -> Vocab:
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]  # upper-case hex, as llama.cpp looks them up
    types += [TokenType.BYTE] * 256
    scores: list[float] = [0.0] * len(tokens)

    normal = _normal_pieces()
    tokens += normal
    types += [TokenType.NORMAL] * len(normal)
    # Like SentencePiece log-probs: earlier (more common) pieces score higher; SPM merges the
    # best-scoring pair first.
    scores += [-float(i) for i in range(len(normal))]
    return Vocab(
        tokens=tuple(tokens), scores=tuple(scores), token_types=tuple(int(t) for t in types)
    )
