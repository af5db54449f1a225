"""The start of a conversation's next turn, evaluated while the engine idles.

A chat's next request repeats the conversation, the answer included, and adds a turn: the
template's end-of-turn and next-user markup comes before any new text (LLaVA: `</s>` then
"\\nUSER:", Gemma: `<end_of_turn>` then "\\n<start_of_turn>user\\n"). That markup, and the
answer's last token when it was cut by max_tokens (sampled, never decoded), are known the
moment the answer ends. So when nothing else waits, the engine evaluates them into the
slot's KV; the next turn finds them there with the rest of its prefix and evaluates only
its new text. A conversation that does not go on (or comes back edited) leaves a few unused
cells: prefix matching is by token, so a wrong guess is never used, only dropped.
llama-server has no such step: its next turn evaluates the markup again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import llama_cpp

from server.engine.batch import TokenBatch
from server.engine.jobs import Slot
from server.engine.prompt import ChatTemplate, PromptError, RenderedPrompt, Segment
from server.engine.textparts import MarkupSplitter, Special
from server.engine.tokens import tokenize_text
from server.engine.types import ChatMessage

logger = logging.getLogger("vlserve.engine")

# What a next user message might start with, each with a different first character: the
# markup's last text tokens that survive all of them do not depend on what follows.
_PROBES = ("Hello", "what", "1", " x", "\n", "?", "\u4f60", '"', "-", "(", "A", "<")
_MAX_TOKENS = 64  # markup longer than this is a template oddity, not worth guessing


def turn_markup(template: ChatTemplate, splitter: MarkupSplitter,
                vocab: llama_cpp.llama_vocab_p) -> tuple[int, ...]:
    """The tokens that follow an assistant answer in every next turn, up to the new user
    text; () when the template does not say so plainly (it varies between turns, or the
    answer's text runs into plain markup whose tokens would depend on the answer)."""
    between = _markup_after_answers(template)
    if between is None:
        return ()
    parts = splitter.parts(RenderedPrompt((Segment(between, False),), ()))
    if not parts or not isinstance(parts[0], Special):
        return ()
    tokens: list[int] = []
    for part in parts[:-1]:
        tokens += _tokens(vocab, part)
    last = parts[-1]
    if isinstance(last, Special):
        tokens += _tokens(vocab, last)
    elif isinstance(last, str):
        # Joined with the user's text into one part when tokenized: only the tokens that
        # every continuation leaves alone are certain.
        tokens += _common_prefix([tokenize_text(vocab, last + probe, add_special=False,
                                                parse_special=False) for probe in _PROBES])
    return tuple(tokens) if 0 < len(tokens) <= _MAX_TOKENS else ()


def guess(markup: Sequence[int], last_token: int | None) -> list[int]:
    """What to evaluate after an answer: its undecoded last token (cut by max_tokens), then
    the markup. An answer that ended on its end-of-turn token needs the markup only; with
    no markup (unknown, or the feature off) there is no guess."""
    if not markup:
        return []
    return [*(() if last_token is None else (last_token,)), *markup]


def prefill(slots: list[Slot], batch: TokenBatch, ctx: llama_cpp.llama_context_p,
            free_cells: int, n_ctx: int, interrupted: Callable[[], bool]) -> int:
    """Evaluate the idle slots' guesses in one decode (the scheduler's batch, left empty);
    returns how many tokens went in. The decode stops as soon as `interrupted()` (a request
    arrived): a guess never delays a request, however fast its client comes back."""
    batch.clear()
    taken: list[tuple[Slot, list[int]]] = []
    for slot in slots:
        tokens, slot.next_turn = slot.next_turn, []
        if not tokens or slot.job is not None or not slot.cached:
            continue
        if len(tokens) > free_cells or slot.n_past + len(tokens) >= n_ctx \
                or batch.n + len(tokens) > batch.capacity:
            continue
        for i, token in enumerate(tokens):
            batch.add(token, slot.n_past + i, slot.seq_id, False)
        taken.append((slot, tokens))
        free_cells -= len(tokens)
    if not taken:
        return 0
    # llama.cpp asks between graph nodes; a Python callback costs about a microsecond a
    # node, so it is set for these decodes only.
    callback = llama_cpp.ggml_abort_callback(lambda _data: bool(interrupted()))
    llama_cpp.llama_set_abort_callback(ctx, callback, None)
    try:
        ret = batch.decode(ctx)
    finally:
        llama_cpp.llama_set_abort_callback(ctx, llama_cpp.ggml_abort_callback(), None)
    batch.clear()
    mem = llama_cpp.llama_get_memory(ctx)
    if ret != 0:  # 2: interrupted; a guess is never retried, and nothing of it is kept
        logger.debug("next-turn prefill stopped (llama_decode %d)", ret)
        for slot, _ in taken:
            llama_cpp.llama_memory_seq_rm(mem, slot.seq_id, slot.n_past, -1)
        return 0
    for slot, tokens in taken:
        slot.cached.extend(tokens)
        slot.n_past += len(tokens)
    return sum(len(tokens) for _, tokens in taken)


def _markup_after_answers(template: ChatTemplate) -> str | None:
    """The markup between an assistant answer and the next user message, the same after
    the first answer and the second, or None."""
    texts = ["vlserve-q1", "vlserve-a1", "vlserve-q2", "vlserve-a2", "vlserve-q3"]
    messages = [ChatMessage("user" if i % 2 == 0 else "assistant", (text,))
                for i, text in enumerate(texts)]
    try:
        segments = template.render(messages).segments
    except PromptError:
        return None
    found: list[str] = []
    for answer, question in (("vlserve-a1", "vlserve-q2"), ("vlserve-a2", "vlserve-q3")):
        at = next((i for i, s in enumerate(segments) if s.user and s.text == answer), None)
        if at is None or at + 2 >= len(segments):
            return None
        markup, after = segments[at + 1], segments[at + 2]
        if markup.user or not after.user or after.text != question:
            return None
        found.append(markup.text)
    return found[0] if found[0] == found[1] else None


def _tokens(vocab: llama_cpp.llama_vocab_p, part: str | Special) -> list[int]:
    if isinstance(part, Special):
        return tokenize_text(vocab, part.text, add_special=False, parse_special=True)
    return tokenize_text(vocab, part, add_special=False, parse_special=False)


def _common_prefix(lists: list[list[int]]) -> list[int]:
    first = lists[0]
    n = 0
    while n < len(first) and all(len(other) > n and other[n] == first[n] for other in lists):
        n += 1
    return first[:n]
