"""User text can't forge special tokens, and preparing a prompt is bounded and linear.

On both demo vocabularies (LLaVA: SentencePiece, Youtu-VL: byte-level BPE), with the real
llama.cpp tokenizer: text a client writes is plain text whatever it spells, the template's
own markup keeps its special tokens, and the prompt's tokens are otherwise exactly what
tokenizing the whole rendered prompt gives.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator

import llama_cpp
import pytest
from conftest import FAMILIES, MODEL_FIXTURES

from server.config import load_settings
from server.engine.model import LoadedModel, load_model
from server.engine.prepare import Preparer, PromptRefused
from server.engine.types import ChatMessage, GenerationRequest, ImageInput

N_CTX = 1024
IMAGE = ImageInput(bytes(range(48)) * 64, 32, 32, "user-text-test")


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest) -> Iterator[LoadedModel]:
    paths = request.getfixturevalue(MODEL_FIXTURES[request.param])
    settings = load_settings(None, model=paths.text, mmproj=paths.mmproj, n_ctx=N_CTX,
                             n_parallel=1, n_threads=1)
    loaded = load_model(settings)
    yield loaded
    loaded.close()


def tokenize(model: LoadedModel, text: str, *, special: bool, add_bos: bool = False
             ) -> list[int]:
    raw = text.encode()
    out = (llama_cpp.llama_token * (len(raw) + 8))()
    n = llama_cpp.llama_tokenize(model.vocab, raw, len(raw), out, len(out), add_bos, special)
    assert n >= 0
    return list(out[:n])


def prompt_ids(model: LoadedModel, *parts: str | ImageInput, role: str = "user"
               ) -> list[int]:
    prompt = Preparer(model, None).prepare(GenerationRequest(
        messages=[ChatMessage(role, parts)], max_tokens=1))
    try:
        return [k for k in prompt.keys() if isinstance(k, int)]
    finally:
        prompt.close()


def specials(model: LoadedModel) -> list[str]:
    """The control-token texts this template uses, plus BOS/EOS and the media marker."""
    eos = llama_cpp.llama_vocab_eos(model.vocab)
    bos = llama_cpp.llama_vocab_bos(model.vocab)
    texts = [llama_cpp.llama_vocab_get_text(model.vocab, t).decode() for t in (eos, bos)]
    return [*texts, *(t for t in model.special_texts if t in model.template.source),
            model.media_marker]


@pytest.mark.parametrize("role", ["user", "system", "assistant"])
def test_special_token_text_from_a_client_stays_text(model: LoadedModel, role: str) -> None:
    eos = llama_cpp.llama_vocab_eos(model.vocab)
    assert eos >= 0
    for text in specials(model):
        plain = prompt_ids(model, "a b", role=role)
        forged = prompt_ids(model, f"a {text} b", role=role)
        special_ids = set(tokenize(model, text, special=True)) - set(
            tokenize(model, text, special=False))
        for token in special_ids | {eos}:
            # The template's own markup has as many of each as for harmless text.
            assert forged.count(token) == plain.count(token), (text, token)
        assert len(forged) > len(plain), text  # the characters are there, as text


def test_the_templates_own_markup_is_still_special(model: LoadedModel) -> None:
    messages = [ChatMessage("user", ("hi",)), ChatMessage("assistant", ("hello",)),
                ChatMessage("user", ("bye",))]
    prompt = Preparer(model, None).prepare(GenerationRequest(messages=messages, max_tokens=1))
    ids = prompt.keys()
    prompt.close()
    markup = "".join(s.text for s in model.template.render(messages).segments if not s.user)
    used = [t for t in model.special_texts if t in markup]
    assert used
    for text in used:
        token = tokenize(model, text, special=True)
        assert len(token) == 1 and token[0] in ids, text
    if llama_cpp.llama_vocab_get_add_bos(model.vocab):
        assert ids[0] == llama_cpp.llama_vocab_bos(model.vocab)


def test_plain_text_tokenizes_as_the_whole_rendered_prompt_would(model: LoadedModel) -> None:
    """Splitting markup from user text must not change the tokens (SentencePiece's leading
    space, BPE merges): the same ids as tokenizing the whole rendered prompt at once."""
    messages = [ChatMessage("system", ("Be brief.",)), ChatMessage("user", ("What is 2+2?",)),
                ChatMessage("assistant", (" Four.",)), ChatMessage("user", ("Sure? ",))]
    rendered = model.template.render(messages)
    expected = tokenize(model, rendered.text, special=True,
                        add_bos=bool(llama_cpp.llama_vocab_get_add_bos(model.vocab)))
    prompt = Preparer(model, None).prepare(GenerationRequest(messages=messages, max_tokens=1))
    try:
        assert prompt.keys() == expected
    finally:
        prompt.close()


def test_an_image_and_a_typed_marker_in_one_message(model: LoadedModel) -> None:
    prompt = Preparer(model, None).prepare(GenerationRequest(
        messages=[ChatMessage("user", (IMAGE, f"is this {model.media_marker}?"))],
        max_tokens=1))
    try:
        assert sum(1 for k in prompt.keys() if not isinstance(k, int)) == 1  # one image
    finally:
        prompt.close()


def test_text_that_cannot_fit_is_refused_from_its_size_before_tokenizing(
        model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.engine import mtmd

    calls: list[int] = []
    real = mtmd.tokenize_parts
    monkeypatch.setattr(mtmd, "tokenize_parts", lambda m, parts: calls.append(1) or real(m, parts))
    renders: list[int] = []
    render = model.template.render
    monkeypatch.setattr(model.template, "render",
                        lambda *args, **kwargs: renders.append(1) or render(*args, **kwargs))
    assert model.max_token_bytes is not None
    text = "x" * (N_CTX * model.max_token_bytes)
    started = time.perf_counter()
    with pytest.raises(PromptRefused) as refused:
        Preparer(model, None).prepare(GenerationRequest(
            messages=[ChatMessage("user", (text,))], max_tokens=1))
    assert refused.value.event.code == "context_length_exceeded"
    assert "at least" in refused.value.event.message
    # Never reached the tokenizer, nor the template: rendering copies the text several
    # times, holding the GIL (and so every other stream) for tens of ms at 45 MB.
    assert calls == [] and renders == []
    assert time.perf_counter() - started < 5
    # An assistant turn may be rendered in part (templates drop earlier reasoning): only
    # the rendered prompt tells, so it is rendered, then refused from its size.
    with pytest.raises(PromptRefused) as rendered:
        Preparer(model, None).prepare(GenerationRequest(
            messages=[ChatMessage("assistant", (text,)), ChatMessage("user", ("Hi",))],
            max_tokens=1))
    assert "at least" in rendered.value.event.message
    assert calls == [] and renders == [1]
    # Just under the bound: tokenized, then refused on its real count.
    with pytest.raises(PromptRefused) as counted:
        Preparer(model, None).prepare(GenerationRequest(
            messages=[ChatMessage("user", ("x" * (N_CTX + 10),))], max_tokens=1))
    assert counted.value.event.code == "context_length_exceeded"
    assert calls == [1] and renders == [1, 1]


def test_the_size_bound_holds_for_the_vocab(model: LoadedModel) -> None:
    """No token covers more text than max_token_bytes: the bound never refuses what fits."""
    n_vocab = llama_cpp.llama_vocab_n_tokens(model.vocab)
    buf = ctypes.create_string_buffer(256)
    longest = max(llama_cpp.llama_token_to_piece(model.vocab, t, buf, len(buf), 0, True)
                  for t in range(n_vocab))
    assert model.max_token_bytes is not None and longest <= model.max_token_bytes
