"""Chat-template rendering: markers, system prompt, BOS handling, sandboxing."""

from __future__ import annotations

import pytest

from server.demo_model import LLAVA_CHAT_TEMPLATE, YOUTU_VL_CHAT_TEMPLATE
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


def test_client_text_is_marked_as_user_text_markers_included() -> None:
    """A typed media marker or special token is the client's text, not markup; the images'
    markers and the turn markup are the template's."""
    rendered = template().render([
        ChatMessage("system", ("S </s>",)),
        ChatMessage("user", (IMAGE, f"look {MARKER}")),
        ChatMessage("assistant", ("A",)),
    ])
    assert [(s.text, s.user) for s in rendered.segments] == [
        ("S </s>", True), (f"\n\nUSER: {MARKER}\n", False), (f"look {MARKER}", True),
        ("\nASSISTANT: ", False), ("A", True), ("</s>\nASSISTANT:", False)]
    assert rendered.images == (IMAGE,)


def test_template_cutting_into_content_errs_towards_user_text() -> None:
    """A template that keeps only part of a message (here: what follows '|') loses the
    opening sentinel: the cut text is still taken as the client's."""
    source = ("{% for m in messages %}<T>{{ m['content'].split('|')[-1] }}</T>"
              "{% endfor %}")
    rendered = template(source).render([ChatMessage("user", ("a|</s>b",))])
    assert rendered.text == "<T></s>b</T>"
    assert [s.user for s in rendered.segments if "</s>b" in s.text] == [True]


@pytest.mark.parametrize("source", [
    "{% for m in messages %}<T>{{ m['content'] | tojson }}</T>{% endfor %}",  # escaped
    "{% for m in messages %}<T>{{ m['content'][1:] }}</T>{% endfor %}",  # cut into
])
def test_a_template_that_alters_the_sentinels_errs_towards_user_text(source: str) -> None:
    rendered = template(source).render([ChatMessage("user", ("</s>",))])
    client = [s for s in rendered.segments if "</s>" in s.text or "\\u003c/s" in s.text]
    assert client and all(s.user for s in client)


def test_a_dropped_image_is_a_prompt_error() -> None:
    source = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(PromptError, match="every image"):
        template(source).render([ChatMessage("user", (IMAGE, "x"))])


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


def test_bos_is_kept_when_tokenization_does_not_add_it() -> None:
    source = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    keep = ChatTemplate(source, bos_token="<s>", eos_token="</s>", media_marker=MARKER,
                        strip_bos=False)
    assert keep.render([ChatMessage("user", ("x",))]).text == "<s>x"


def test_youtu_vl_turns_with_images_right_before_the_text() -> None:
    youtu = ChatTemplate(YOUTU_VL_CHAT_TEMPLATE, bos_token="<|begin_of_text|>",
                         eos_token="<|end_of_text|>", media_marker=MARKER, strip_bos=False,
                         part_separator="")
    rendered = youtu.render([
        ChatMessage("user", (IMAGE, "What is this?")),
        ChatMessage("assistant", ("A cat.",)),
        ChatMessage("user", ("Sure?",)),
    ])
    assert rendered.text == (
        "<|begin_of_text|>system\nYou are a helpful assistant.<|end_of_text|>\n"
        f"<|begin_of_text|>user\n{MARKER}What is this?<|end_of_text|>\n"
        "<|begin_of_text|>assistant\nA cat.<|end_of_text|>\n"
        "<|begin_of_text|>user\nSure?<|end_of_text|>\n"
        "<|begin_of_text|>assistant\n"
    )
    own = youtu.render([ChatMessage("system", ("Be brief.",)), ChatMessage("user", ("hi",))])
    assert own.text.startswith("<|begin_of_text|>system\nBe brief.<|end_of_text|>\n")
    assert "helpful" not in own.text


def test_runtime_error_inside_template_is_a_prompt_error() -> None:
    source = "{{ messages[0]['content'] + 1 }}"
    with pytest.raises(PromptError, match="TypeError"):
        template(source).render([ChatMessage("user", ("x",))])
