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

The answer itself comes back as text, and the next prompt tokenizes it afresh: a model may
have written it in tokens the tokenizer would split otherwise (random weights often do,
real models now and then), and an answer cut by a stop string holds tokens of the stop
text. So the slot's answer is compared with the answer as the next prompt will tokenize
it (the conversation's text after its last image, rendered with the answer and tokenized
here), and from where they part the slot takes that tokenization: the KV then holds what a
cold server would evaluate for the same request, token for token (the same answer, warm or
cold), and the next turn reuses all of it.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Sequence

import llama_cpp

from server.engine import llama_log
from server.engine.batch import TokenBatch
from server.engine.jobs import NextTurn, Slot
from server.engine.prefix import n_positions
from server.engine.prompt import ChatTemplate, PromptError, RenderedPrompt, Segment
from server.engine.textparts import MarkupSplitter, Special
from server.engine.tokens import part_tokens, text_prompt, tokenize_text
from server.engine.types import ChatMessage, ImageInput

logger = logging.getLogger("vlserve.engine")

# What a next user message might start with, each with a different first character: the
# markup's last text tokens that survive all of them do not depend on what follows.
_PROBES = ("Hello", "what", "1", " x", "\n", "?", "\u4f60", '"', "-", "(", "A", "<")
_MAX_TOKENS = 64  # markup longer than this is a template oddity, not worth guessing
# Slots holding more entries keep the plain guess: the conversation is rendered and its
# text tokenized on the engine thread (idle, but not interruptible there).
_MAX_TAIL = 8192


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
        tokens += part_tokens(vocab, part)
    last = parts[-1]
    if isinstance(last, Special):
        tokens += part_tokens(vocab, last)
    elif isinstance(last, str):
        # Joined with the user's text into one part when tokenized: only the tokens that
        # every continuation leaves alone are certain.
        tokens += _common_prefix([tokenize_text(vocab, last + probe, add_special=False,
                                                parse_special=False) for probe in _PROBES])
    return tuple(tokens) if 0 < len(tokens) <= _MAX_TOKENS else ()


class TailTokenizer:
    """A conversation's prompt tokens after its last image, as the prompt's own tokenization
    has them (images are left alone: preprocessing one costs milliseconds)."""

    def __init__(self, template: ChatTemplate, splitter: MarkupSplitter,
                 vocab: llama_cpp.llama_vocab_p, system_prompt: str | None) -> None:
        self._template = template
        self._splitter = splitter
        self._vocab = vocab
        self._system_prompt = system_prompt

    def __call__(self, messages: list[ChatMessage]) -> list[int] | None:
        try:
            rendered = self._template.render(messages, self._system_prompt)
        except PromptError:
            return None
        parts = self._splitter.parts(rendered)
        images = [i for i, part in enumerate(parts) if isinstance(part, ImageInput)]
        if not images:  # the whole prompt, with the vocab's BOS as the real one has it
            return [k for k in text_prompt(self._vocab, parts).keys() if isinstance(k, int)]
        tokens: list[int] = []
        for part in parts[images[-1] + 1:]:
            assert not isinstance(part, ImageInput)
            tokens += part_tokens(self._vocab, part)
        return tokens


def plan(slot: Slot, turn: NextTurn, markup: Sequence[int], tail: TailTokenizer | None
         ) -> tuple[int, list[int]]:
    """How many of the slot's entries to keep, and the tokens to evaluate after them."""
    keep = len(slot.cached)
    if tail is None or not markup or keep > _MAX_TAIL:
        return keep, turn.guess
    probe = ChatMessage("user", ("vlserve next turn",))
    full = tail([*turn.messages, ChatMessage("assistant", (turn.answer,)), probe])
    end = _after_last(full or [], markup)
    if full is None or end is None:
        return keep, turn.guess
    cached = slot.cached
    images = [i for i, entry in enumerate(cached) if not isinstance(entry, int)]
    start = images[-1] + 1 if images else 0
    same = start
    while same < keep and same - start < end and cached[same] == full[same - start]:
        same += 1
    # Parted before the answer: this tokenization is not the prompt's (mtmd adds tokens
    # of its own around some families' images): the plain guess, nothing rewritten.
    if same < keep - turn.generated - 2:
        return keep, turn.guess
    return same, list(full[same - start:end])


def _after_last(tokens: Sequence[int], run: Sequence[int]) -> int | None:
    """The index after the last occurrence of `run` in `tokens` (the markup after the
    answer: the probe's text holds none), or None."""
    run = list(run)  # a tuple never equals a list slice
    for i in range(len(tokens) - len(run), -1, -1):
        if list(tokens[i:i + len(run)]) == run:
            return i + len(run)
    return None


def guess(markup: Sequence[int], last_token: int | None) -> list[int]:
    """What to evaluate after an answer: its undecoded last token (cut by max_tokens), then
    the markup. An answer that ended on its end-of-turn token needs the markup only; with
    no markup (unknown, or the feature off) there is no guess."""
    if not markup:
        return []
    return [*(() if last_token is None else (last_token,)), *markup]


def prefill(slots: list[Slot], batch: TokenBatch, ctx: llama_cpp.llama_context_p,
            free_cells: int, n_ctx: int, interrupted: Callable[[], bool],
            markup: Sequence[int], tail: TailTokenizer | None) -> int:
    """Evaluate the idle slots' next turns in one decode (the scheduler's batch, left
    empty); returns how many tokens went in. The decode stops as soon as `interrupted()` (a
    request arrived): a guess never delays a request, however fast its client comes back."""
    batch.clear()
    mem = llama_cpp.llama_get_memory(ctx)
    taken: list[tuple[Slot, list[int]]] = []
    for slot in slots:
        turn, slot.next_turn = slot.next_turn, None
        if turn is None or slot.job is not None or not slot.cached:
            continue
        keep, tokens = plan(slot, turn, markup, tail)
        if not tokens or len(tokens) > free_cells or batch.n + len(tokens) > batch.capacity:
            continue
        if keep < len(slot.cached):  # tokens the next prompt will not have: out they go
            slot.cached.truncate(keep)
            slot.n_past = n_positions(slot.cached)
            llama_cpp.llama_memory_seq_rm(mem, slot.seq_id, slot.n_past, -1)
        if slot.n_past + len(tokens) >= n_ctx:
            continue
        for i, token in enumerate(tokens):
            batch.add(token, slot.n_past + i, slot.seq_id, False)
        taken.append((slot, tokens))
        free_cells -= len(tokens)
    if not taken:
        return 0
    # llama.cpp asks between graph nodes; a Python callback costs about a microsecond a
    # node, so it is set for these decodes only.
    engine_thread = threading.get_ident()

    def abort(_data: ctypes.c_void_p) -> bool:
        if not interrupted():
            return False
        # llama.cpp logs "failed to compute graph" and the like as errors for the abort:
        # asked for, so debug lines, not an operator's alarm at every quick next turn.
        llama_log.hush(engine_thread)
        return True

    callback = llama_cpp.ggml_abort_callback(abort)
    llama_cpp.llama_set_abort_callback(ctx, callback, None)
    try:
        ret = batch.decode(ctx)
    finally:
        llama_cpp.llama_set_abort_callback(ctx, llama_cpp.ggml_abort_callback(), None)
        llama_log.unhush(engine_thread)
    batch.clear()
    if ret != 0:  # a guess is never retried (interrupted or not), and nothing of it is kept
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


def _common_prefix(lists: list[list[int]]) -> list[int]:
    first = lists[0]
    n = 0
    while n < len(first) and all(len(other) > n and other[n] == first[n] for other in lists):
        n += 1
    return first[:n]
