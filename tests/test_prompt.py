"""Chat-template rendering: markers, system prompt, BOS handling, sandboxing."""

from __future__ import annotations

import pytest

from server.demo_model import LLAVA_CHAT_TEMPLATE
from server.engine.prompt import ChatTemplate, PromptError
from server.engine.types import ChatMessage, ImageInput

MARKER = "<__media__>"
IMAGE = ImageInput(b"\0" * 12, 2, 2, "h1")


def template(source: str = LLAVA_CHAT_TEMPLATE) -> ChatTemplate:
    return ChatTemplate(source, bos_token="<s>", eos_token="</s>", media_marker=MARKER)


def test_llava_turns_and_images() -> None:
    rendered = template().render([
        ChatMessage("system", ("Be brief.",)),
        ChatMessage("user", (IMAGE, "What is this?")),
        ChatMessage("assistant", ("A cat.",)),
        ChatMessage("user", ("Sure?",)),
    ])
    assert rendered.text == (f"Be brief.\n\nUSER: {MARKER}\nWhat is this?\nASSISTANT: A cat.</s>\n"
                             "USER: Sure?\nASSISTANT:")
    assert rendered.images == (IMAGE,)


def test_default_system_prompt_only_when_absent() -> None:
    user = ChatMessage("user", ("hi",))
    assert template().render([user], "SYS").text.startswith("SYS\n\n")
    own = template().render([ChatMessage("system", ("MINE",)), user], "SYS").text
    assert own.startswith("MINE") and "SYS" not in own


def test_leading_bos_is_stripped_because_mtmd_adds_it() -> None:
    source = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert template(source).render([ChatMessage("user", ("x",))]).text == "x"


def test_marker_smuggled_in_text_is_rejected() -> None:
    with pytest.raises(PromptError):
        template().render([ChatMessage("user", (f"look {MARKER}",))])


def test_raise_exception_in_template_is_a_prompt_error() -> None:
    source = "{{ raise_exception('only user messages') }}"
    with pytest.raises(PromptError, match="only user messages"):
        template(source).render([ChatMessage("user", ("x",))])


def test_template_is_sandboxed() -> None:
    source = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(PromptError):
        template(source).render([ChatMessage("user", ("x",))])


def test_broken_template_is_reported() -> None:
    with pytest.raises(PromptError, match="does not compile"):
        template("{% for %}")
