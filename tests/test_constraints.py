"""JSON Schema → grammar: the enforced subset converts, everything else is refused by name."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from server.engine.constraints import (
    MAX_REPEAT,
    ConstraintError,
    json_object_grammar,
    schema_grammar,
)
from server.engine.utf8_guard import Utf8Guard, Utf8Vocab

SUPPORTED = [
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
     "additionalProperties": False, "title": "T", "description": "d"},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
    {"enum": ["red", "green", 3, None]},
    {"type": "string", "enum": ["a", "b"]},
    {"const": {"x": [1, 2]}},
    {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
    {"type": ["string", "null"]},
    {"type": "string", "format": "date-time"},
    {"$defs": {"p": {"type": "object", "properties": {"n": {"type": "number"}}}},
     "type": "object", "properties": {"p": {"$ref": "#/$defs/p"}}},
    {"type": "object"},
]


@pytest.mark.parametrize("schema", SUPPORTED)
def test_supported_schemas_convert(schema: dict) -> None:
    grammar = schema_grammar(schema)
    assert "root ::=" in grammar


@pytest.mark.parametrize(("schema", "where"), [
    ({"type": "integer", "minimum": 1, "maximum": 5}, "#/maximum"),
    ({"type": "string", "format": "email"}, "#/format"),
    ({"type": "string", "pattern": "^a+$"}, "#/pattern"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "#/oneOf"),
    ({"allOf": [{"type": "object"}]}, "#/allOf"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "#/uniqueItems"),
    ({"type": "array", "minItems": 2}, "minItems"),
    ({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 2}}},
     "#/properties/a/multipleOf"),
    ({"type": "object", "properties": {}, "required": ["ghost"]}, "#/required"),
    ({"$ref": "#/$defs/missing"}, "#/$ref"),
    ({"$ref": "https://example.com/schema.json"}, "#/$ref"),
    ({"type": "no-such-type"}, "#/type"),
    ({"type": ["string", "object"]}, "#/type/1"),
    ({"enum": []}, "#/enum"),
    ({"type": "integer", "enum": ["x"]}, "#/enum"),
    ({"type": "string", "maxLength": MAX_REPEAT + 1}, "#/maxLength"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "#/maxLength"),
    ({"title": "no type"}, "#: a schema must say its 'type'"),
    ({"$ref": "#/$defs/a", "type": "string", "$defs": {"a": {"type": "string"}}}, "#/type"),
])
def test_unenforceable_schemas_are_refused_by_name(schema: dict, where: str) -> None:
    with pytest.raises(ConstraintError) as raised:
        schema_grammar(schema)
    assert where in str(raised.value)


def test_strings_exclude_raw_control_characters() -> None:
    """JSON forbids raw control characters inside strings; the converter's own rule allows
    them, so a model could emit an answer no JSON parser reads."""
    for grammar in (json_object_grammar(), schema_grammar({"type": "string", "maxLength": 4})):
        char_rule = next(line for line in grammar.splitlines() if line.startswith("char ::="))
        assert char_rule.startswith(r'char ::= [^"\\\x00-\x1F]')


def test_utf8_guard_follows_the_strict_decoder() -> None:
    """Byte tokens may spell only real UTF-8: no overlong forms, surrogates or code points
    past U+10FFFF (llama.cpp's grammar lets all three through)."""
    pieces = [b"a", b"\xc3", b"\xa9", b"\xc0", b"\x80", b"\xed", b"\xa0", b"\xf8", b"\xe2\x82"]
    vocab = Utf8Vocab(pieces)
    assert np.flatnonzero(vocab.invalid_alone).tolist() == [2, 3, 4, 6, 7]
    guard = Utf8Guard(vocab)
    ids = np.arange(len(pieces))
    logits = np.zeros(len(pieces), dtype=np.float32)
    guard.mask(ids, logits)
    assert np.isfinite(logits).tolist() == [i not in (2, 3, 4, 6, 7) for i in ids]
    guard.accept(1)  # é begun: only a continuation byte may follow
    assert guard.allows(2) and not guard.allows(0) and not guard.allows(5)
    logits = np.zeros(len(pieces), dtype=np.float32)
    guard.mask(ids, logits)
    assert np.isfinite(logits).tolist() == [i in (2, 4, 6) for i in ids]
    guard.accept(2)
    assert guard.pending == b""
    guard.accept(5)  # \xed then \xa0 would be a surrogate
    assert not guard.allows(6) and guard.allows(4)


def test_check_then_resample_draws_what_a_full_grammar_mask_draws(demo_model) -> None:
    """Greedy under the grammar must pick the very tokens a grammar-first chain picks, on
    the fast path, on the window resample (random weights are refused almost every token)
    and on the full-vocabulary fallback (penalties)."""
    from bench.constrained import SCHEMA, Run
    from server.engine.sampling import TokenSampler, build_sampler
    from server.engine.types import SamplingParams
    from server.timings import StageTimer

    run = Run(demo_model.text, threads=1)
    grammar = schema_grammar(SCHEMA)

    def answer(sampler: TokenSampler) -> list[int]:
        tokens: list[int] = []
        run.decode(lambda: tokens.append(sampler.sample(run.ctx, -1)) or tokens[-1], 60)
        sampler.free()
        return tokens

    for params in (SamplingParams(temperature=0.0, grammar=grammar),
                   SamplingParams(temperature=0.0, grammar=grammar, repeat_penalty=1.3)):
        timer = StageTimer()
        ours = answer(build_sampler(params, run.vocab, run.utf8, run.eog, timer))
        assert timer.grammar_resamples > 10
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_grammar(
            run.vocab, grammar.encode(), b"root"))
        if params.repeat_penalty != 1.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_penalties(
                len(run.utf8.pieces), params.penalty_last_n, params.repeat_penalty, 0.0, 0.0))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        assert ours == answer(TokenSampler(chain))


def test_greedy_without_penalties_reads_the_argmax_and_picks_what_the_chain_picks(
        demo_model) -> None:
    """Plain greedy skips llama.cpp's chain (it copies every logit first) and takes the
    largest logit; the tokens are the chain's, with ignore_eos's banned tokens too."""
    from bench.constrained import Run
    from server.engine.sampling import ArgmaxSampler, TokenSampler, build_sampler
    from server.engine.types import SamplingParams
    from server.timings import StageTimer

    run = Run(demo_model.text, threads=1)

    def answer(sampler: TokenSampler, n: int = 40) -> list[int]:
        tokens: list[int] = []
        run.decode(lambda: tokens.append(sampler.sample(run.ctx, -1)) or tokens[-1], n)
        sampler.free()
        return tokens

    def chain(banned: frozenset[int] = frozenset()) -> TokenSampler:
        sampler = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params())
        if banned:
            biases = (llama_cpp.llama_logit_bias * len(banned))(
                *(llama_cpp.llama_logit_bias(t, float("-inf")) for t in sorted(banned)))
            llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_logit_bias(
                len(run.utf8.pieces), len(banned), biases))
        llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())
        return TokenSampler(sampler)

    greedy = build_sampler(SamplingParams(temperature=0.0), run.vocab, run.utf8, run.eog,
                           StageTimer())
    assert isinstance(greedy, ArgmaxSampler)
    plain = answer(greedy)
    assert plain == answer(chain())
    # Ban the tokens it chose most: the masked path must then agree with the chain's bias.
    banned = frozenset(sorted(set(plain), key=plain.count)[-3:])
    assert answer(ArgmaxSampler(len(run.utf8.pieces), banned)) == answer(chain(banned))
    # Penalties and grammars keep llama.cpp's chain.
    assert not isinstance(build_sampler(SamplingParams(temperature=0.0, repeat_penalty=1.2),
                                        run.vocab, run.utf8, run.eog, StageTimer()),
                          ArgmaxSampler)


def test_a_stop_marker_ends_a_json_answer_only_where_the_json_is_complete(glm4v_model) -> None:
    """GLM's <|observation|> stops an answer but is no end-of-generation token to the
    vocabulary: llama.cpp's grammar reads it as its text, which fits inside a JSON string,
    so an answer could stop there unfinished (seen: 3 json_object answers in 800 ended
    mid-string with finish_reason "stop"). It is drawn only once the object is complete."""
    from bench.constrained import Run
    from server.engine.sampling import GrammarSampler, build_sampler
    from server.engine.types import SamplingParams
    from server.timings import StageTimer

    run = Run(glm4v_model.text, threads=1)
    ids = (llama_cpp.llama_token * 8)()
    text = b"<|observation|>"
    assert llama_cpp.llama_tokenize(run.vocab, text, len(text), ids, 8, False, True) == 1
    marker = ids[0]
    assert not llama_cpp.llama_vocab_is_eog(run.vocab, marker)
    sampler = build_sampler(SamplingParams(temperature=0.0, grammar=json_object_grammar()),
                            run.vocab, run.utf8, run.eog | {marker}, StageTimer())
    assert isinstance(sampler, GrammarSampler)
    pieces = run.utf8.pieces

    def favour(*ranked: int) -> np.ndarray:
        logits = np.zeros(len(pieces), dtype=np.float32)
        for rank, token in enumerate(ranked):
            logits[token] = 10.0 - rank
        return logits

    for char in (b"{", b'"'):
        token = pieces.index(char)
        assert sampler.choose(favour(marker, token)) == token  # never the marker inside
    letter = pieces.index(b"a")
    assert sampler.choose(favour(marker, letter)) == letter  # inside the string
    for char in (b'"', b":", b"1", b"}"):
        token = pieces.index(char)
        assert sampler.choose(favour(token)) == token
    assert sampler.choose(favour(marker, letter)) == marker  # complete: it may end here
    sampler.free()
