"""Token samplers from request parameters: llama.cpp's own sampler chain, and for
constrained answers the chain plus a grammar that is consulted only when it must be."""

from __future__ import annotations

import ctypes
import random
import time

import llama_cpp
import numpy as np

from server.engine.types import SamplingParams
from server.engine.utf8_guard import Utf8Guard, Utf8Vocab
from server.timings import StageTimer

# Candidates a rejected draw is taken again from, best first, before the whole vocabulary
# is masked: a small window usually holds the token (grammar checks ~0.1 ms), a wider one
# the first token of a document a model wasn't about to write (~2 ms on a 262k vocabulary,
# against ~40 ms for all of it).
RESAMPLE_WINDOWS = (256, 8192)
PREFILTER_FROM = 512  # candidates; fewer go straight to the grammar
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


class GrammarError(ValueError):
    """llama.cpp refused the grammar, or the grammar allows no token at some point."""


class TokenSampler:
    """Picks each next token of one request. Owned by the engine thread; `free` once done."""

    def __init__(self, chain: llama_cpp.llama_sampler_p) -> None:
        self.chain = chain

    def sample(self, ctx: llama_cpp.llama_context_p, index: int) -> int:
        return llama_cpp.llama_sampler_sample(self.chain, ctx, index)

    def free(self) -> None:
        llama_cpp.llama_sampler_free(self.chain)


class ArgmaxSampler(TokenSampler):
    """Greedy decoding when nothing changes the logits (no grammar, no penalties): the
    largest logit read straight from llama.cpp's output, ~0.03 ms on a 262k vocabulary.
    llama.cpp's chain first copies every logit into a candidate array (~0.3 ms a token
    there, per stream: a few percent of a step on a small model with a large vocabulary).
    Ties go to the lower id, as in llama.cpp's greedy sampler."""

    def __init__(self, n_vocab: int, banned: frozenset[int] = frozenset()) -> None:
        self._logits_type = ctypes.c_float * n_vocab  # built once: as_array's is per call
        self._banned = banned  # ignore_eos: end-of-generation tokens are never picked
        self._banned_ids = np.fromiter(sorted(banned), dtype=np.int64, count=len(banned))

    def sample(self, ctx: llama_cpp.llama_context_p, index: int) -> int:
        row = llama_cpp.llama_get_logits_ith(ctx, index)
        logits = np.frombuffer(self._logits_type.from_address(ctypes.addressof(row.contents)),
                               dtype=np.float32)
        token = int(logits.argmax())
        if token in self._banned:  # rare: only then is the vocabulary copied
            masked = logits.copy()
            masked[self._banned_ids] = -np.inf
            token = int(masked.argmax())
        return token

    def free(self) -> None:
        pass  # nothing native


class GrammarSampler(TokenSampler):
    """Samples with the normal chain, then checks only the chosen token against the grammar
    (as llama.cpp's common sampler does); a grammar-first chain would decode every piece of
    the vocabulary on every token. On a rejection the token is drawn again from the best
    RESAMPLE_WINDOWS candidates with the grammar applied, which gives exactly the draw a
    full-vocabulary mask would whenever the window holds enough allowed tokens (one for
    greedy, top_k otherwise): every allowed token outside it ranks below all of those.
    Otherwise, and with penalties (they reorder logits), the whole vocabulary is masked."""

    def __init__(self, chain: llama_cpp.llama_sampler_p, grammar: llama_cpp.llama_sampler_p,
                 utf8: Utf8Vocab, params: SamplingParams, eog_tokens: frozenset[int],
                 timer: StageTimer, markers: frozenset[int] = frozenset(),
                 end_probe: int | None = None) -> None:
        super().__init__(chain)
        self.grammar = grammar
        self._utf8 = Utf8Guard(utf8)
        self._eog = eog_tokens
        # Stop markers the vocabulary does not call end-of-generation (GLM's
        # <|observation|>): the grammar reads such a token as its text, which fits inside a
        # JSON string, yet it ends the answer. It may only where the grammar could end, as
        # asked with `end_probe`, a token the vocabulary does call end-of-generation.
        self._markers = markers
        self._marker_ids = np.fromiter(sorted(markers), dtype=np.int32, count=len(markers))
        self._end_probe = end_probe
        self._probe = np.zeros(1, dtype=_TOKEN_DATA)
        self._timer = timer
        n_vocab = len(utf8.pieces)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._cands = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._one = np.zeros(1, dtype=_TOKEN_DATA)
        self._windows = [llama_cpp.llama_sampler_init_top_k(size)
                         for size in RESAMPLE_WINDOWS if size < n_vocab]
        self._window_needs = _window_needs(params)

    def sample(self, ctx: llama_cpp.llama_context_p, index: int) -> int:
        return self.choose(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index),
                                                 shape=(len(self._ids),)))

    def choose(self, logits: np.ndarray) -> int:
        """The token for these logits (the vocabulary's), accepted into the grammar."""
        selected, kept = _apply(self.chain, self._fill(logits), len(self._ids))
        token = int(kept[selected]["id"])
        t0 = time.perf_counter()
        if token in self._markers:  # an end of the answer, not text
            refused = not self._may_end()
        else:
            one = self._one
            one["id"], one["logit"], one["p"] = token, logits[token], 0.0
            _apply(self.grammar, one, 1)
            refused = not np.isfinite(one["logit"][0]) or not self._utf8.allows(token)
        if refused:
            self._timer.grammar_resamples += 1
            token = self._resample(logits)
        if token not in self._eog:  # an end-of-generation token ends the request here
            llama_cpp.llama_sampler_accept(self.grammar, token)
            self._utf8.accept(token)
        self._timer.add("grammar", time.perf_counter() - t0)
        # Accepted only now: the chain's stateful samplers (penalties) must see the kept token.
        llama_cpp.llama_sampler_accept(self.chain, token)
        return token

    def _fill(self, logits: np.ndarray) -> np.ndarray:
        cands = self._cands
        cands["id"] = self._ids
        cands["logit"] = logits
        cands["p"] = 0.0
        return cands

    def _resample(self, logits: np.ndarray) -> int:
        cands = self._fill(logits)
        for top in self._windows if self._window_needs else ():
            size, best = _apply(top, cands, len(cands))
            window = best[:size].copy()
            self._mask(window)
            if np.isfinite(window["logit"]).sum() >= self._window_needs:
                return self._pick(window)
            cands = self._fill(logits)
        self._mask(cands)
        return self._pick(cands)

    def _mask(self, cands: np.ndarray) -> None:
        """-inf on every candidate the grammar (or UTF-8) refuses. The grammar itself only
        sees candidates whose first character it may accept: one probe token per ASCII
        character says which those are, and a piece whose first character is refused is
        refused whole; that spares decoding most of a large vocabulary."""
        logits = cands["logit"]
        markers = np.isin(cands["id"], self._marker_ids) if len(self._marker_ids) else None
        # Stop markers end the answer: allowed where the grammar may end, whatever it makes
        # of their text.
        ending = logits[markers].copy() if markers is not None and self._may_end() else None
        self._utf8.mask(cands["id"], logits)
        if len(cands) > PREFILTER_FROM:
            first = self._utf8.vocab.first_ascii[cands["id"]]
            logits[self._refused_first_chars()[first]] = -np.inf
        live = np.flatnonzero(np.isfinite(logits))
        subset = cands[live]  # a copy, contiguous for llama.cpp
        _apply(self.grammar, subset, len(subset))
        logits[live] = subset["logit"]
        if markers is not None:
            logits[markers] = -np.inf if ending is None else ending

    def _may_end(self) -> bool:
        """Whether the grammar would accept the end of the answer now."""
        if self._end_probe is None:
            return False  # nothing to ask with: a marker never ends a constrained answer
        probe = self._probe
        probe["id"], probe["logit"], probe["p"] = self._end_probe, 0.0, 0.0
        _apply(self.grammar, probe, 1)
        return bool(np.isfinite(probe["logit"][0]))

    def _refused_first_chars(self) -> np.ndarray:
        """By first byte (index 128: not ASCII, never refused here): whether the grammar
        refuses the one-character piece made of it now."""
        vocab = self._utf8.vocab
        probes = np.zeros(len(vocab.ascii_probes), dtype=_TOKEN_DATA)
        probes["id"] = vocab.ascii_probes
        _apply(self.grammar, probes, len(probes))
        refused = np.zeros(129, dtype=bool)
        refused[vocab.probe_chars[~np.isfinite(probes["logit"])]] = True
        return refused

    def _pick(self, cands: np.ndarray) -> int:
        selected, kept = _apply(self.chain, cands, len(cands))
        if not np.isfinite(kept[selected]["logit"]):
            raise GrammarError("the grammar allows no token here")
        return int(kept[selected]["id"])

    def free(self) -> None:
        super().free()
        llama_cpp.llama_sampler_free(self.grammar)
        for top in self._windows:
            llama_cpp.llama_sampler_free(top)


def _penalized(params: SamplingParams) -> bool:
    return (params.repeat_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


def _window_needs(params: SamplingParams) -> int:
    """How many allowed tokens the resample window must hold for its draw to be exact
    (0: never exact, mask the whole vocabulary). Penalties and biases change the order the
    window is cut from."""
    if _penalized(params) or params.logit_bias:
        return 0
    if params.temperature <= 0.0:
        return 1
    return params.top_k if 0 < params.top_k <= RESAMPLE_WINDOWS[0] // 2 else 0


def _apply(sampler: llama_cpp.llama_sampler_p, cands: np.ndarray, size: int
           ) -> tuple[int, np.ndarray]:
    """Run a sampler over candidates in place; samplers may sort, shrink or re-point them,
    so the result is read back through the array struct: (selected index, the data)."""
    array = llama_cpp.llama_token_data_array(
        data=cands.ctypes.data_as(llama_cpp.llama_token_data_p), size=size, selected=-1,
        sorted=False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
    data = np.ctypeslib.as_array(ctypes.cast(array.data, ctypes.POINTER(ctypes.c_byte)),
                                 shape=(array.size * _TOKEN_DATA.itemsize,))
    return int(array.selected), data.view(_TOKEN_DATA)


def build_sampler(params: SamplingParams, model_vocab: llama_cpp.llama_vocab_p,
                  utf8: Utf8Vocab, eog_tokens: frozenset[int], timer: StageTimer
                  ) -> TokenSampler:
    """The request's sampler; GrammarError when llama.cpp rejects its grammar."""
    if params.grammar is None and params.temperature <= 0.0 and not _penalized(params) \
            and not params.logit_bias:
        return ArgmaxSampler(len(utf8.pieces), eog_tokens if params.ignore_eos else frozenset())
    chain = build_sampler_chain(params, len(utf8.pieces), eog_tokens)
    if params.grammar is None:
        return TokenSampler(chain)
    grammar = llama_cpp.llama_sampler_init_grammar(model_vocab, params.grammar.encode(), b"root")
    if not grammar:
        llama_cpp.llama_sampler_free(chain)
        raise GrammarError("llama.cpp could not parse the grammar made from this schema")
    vocab_eog = sorted(t for t in eog_tokens if llama_cpp.llama_vocab_is_eog(model_vocab, t))
    return GrammarSampler(chain, grammar, utf8, params, eog_tokens, timer,
                          markers=eog_tokens.difference(vocab_eog),
                          end_probe=vocab_eog[0] if vocab_eog else None)


def build_sampler_chain(params: SamplingParams, n_vocab: int,
                        eog_tokens: frozenset[int] = frozenset()) -> llama_cpp.llama_sampler_p:
    """A chain the caller owns (free with llama_sampler_free)."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    biases = list(params.logit_bias)
    if params.ignore_eos:
        # End-of-generation tokens can never be drawn: the answer runs to max_tokens.
        biases += [(t, float("-inf")) for t in sorted(eog_tokens)]
    if biases:
        array = (llama_cpp.llama_logit_bias * len(biases))(
            *(llama_cpp.llama_logit_bias(t, b) for t, b in biases))
        add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), array))
    if _penalized(params):
        add(
            chain,
            llama_cpp.llama_sampler_init_penalties(
                n_vocab,
                params.penalty_last_n,
                params.repeat_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            ),
        )
    if params.temperature <= 0.0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
    seed = params.seed if params.seed is not None else random.getrandbits(32)
    add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain
