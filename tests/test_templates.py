"""The chat-template table: resolution order, names, files, inline Jinja, stop markers."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.demo_model import LLAVA_CHAT_TEMPLATE
from server.engine.detokenize import TextStream
from server.engine.prompt import ChatTemplate
from server.engine.templates import (
    CHATML,
    GEMMA,
    GLM_4,
    VICUNA,
    TemplateConfigError,
    known_names,
    resolve_template,
    template_for,
)
from server.engine.types import ChatMessage

OWN = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
GEMMA3 = {"general.architecture": "gemma3"}


def render(source: str, messages: list[ChatMessage], **kwargs: object) -> str:
    template = ChatTemplate(source, bos_token="<bos>", eos_token="<eos>",
                            media_marker="<__media__>")
    return template.render(messages, **kwargs).text  # type: ignore[arg-type]


def test_setting_beats_gguf_beats_family_beats_vicuna() -> None:
    with_own = {**GEMMA3, "tokenizer.chat_template": OWN}
    assert resolve_template("chatml", with_own).name == "chatml"
    assert (resolve_template(None, with_own).name,
            resolve_template(None, with_own).source) == ("gguf", "gguf")
    assert (resolve_template(None, GEMMA3).name,
            resolve_template(None, GEMMA3).source) == ("gemma", "family")
    unknown = resolve_template(None, {"general.architecture": "mamba"})
    assert (unknown.name, unknown.source, unknown.template) == ("vicuna", "default", VICUNA)
    assert "mamba" in unknown.reason


@pytest.mark.parametrize("value, name", [("vicuna", "vicuna"), ("llava-1.5", "vicuna"),
                                         ("ChatML", "chatml"), ("gemma", "gemma"),
                                         ("youtu-vl", "youtu-vl"), ("llama3", "llama-3"),
                                         ("glm-4", "glm-4"), ("GLM-4V", "glm-4")])
def test_known_names_and_aliases(value: str, name: str) -> None:
    chosen = resolve_template(value, {})
    assert (chosen.name, chosen.source) == (name, "config")


def test_a_jinja_file_and_inline_jinja(tmp_path: Path) -> None:
    path = tmp_path / "mine.jinja"
    path.write_text(OWN)
    from_file = resolve_template(str(path), {})
    assert (from_file.name, from_file.template) == ("file", OWN)
    assert str(path) in from_file.reason
    inline = resolve_template(OWN, {})
    assert (inline.name, inline.template) == ("inline", OWN)
    # Recognised as a ChatML layout, so it stops at ChatML's markers.
    assert inline.stops == from_file.stops == ("<|im_end|>", "<|im_start|>")


def test_bad_names_and_missing_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(TemplateConfigError, match="neither a known template") as err:
        resolve_template("vicunaa", {})
    assert "vicuna" in str(err.value) and "chatml" in str(err.value)
    with pytest.raises(TemplateConfigError, match="No such file"):
        resolve_template(str(tmp_path / "gone.jinja"), {})


def test_every_entry_has_next_turn_markers() -> None:
    for name in known_names():
        chosen = resolve_template(name, {})
        assert chosen.stops, name


def test_gguf_template_of_a_known_layout_gets_its_stops() -> None:
    chosen = resolve_template(None, {"tokenizer.chat_template": LLAVA_CHAT_TEMPLATE})
    assert chosen.stops == ("\nUSER:", "\nASSISTANT:")
    assert resolve_template(None, {"tokenizer.chat_template": "{{ messages }}"}).stops == ()


def test_preset_stops_are_added_once() -> None:
    chosen = resolve_template("vicuna", {}, ("\nUSER:", "###"))
    assert chosen.stops == ("\nUSER:", "\nASSISTANT:", "###")


def test_vicuna_stop_ends_an_invented_turn_whatever_the_token_split() -> None:
    stops = resolve_template("vicuna", {}).stops
    answer = " The capital of France is Paris.\nUSER: What is the capital of Spain?"
    for step in (1, 2, 3, 7):
        stream = TextStream(stops)
        out = "".join(stream.push(answer[i:i + step].encode())
                      for i in range(0, len(answer), step))
        assert stream.stopped
        assert out + stream.finish() == " The capital of France is Paris."


def test_gemma_and_chatml_layouts() -> None:
    chat = [ChatMessage("system", ("Be brief.",)), ChatMessage("user", ("Hi",)),
            ChatMessage("assistant", ("Hello.",)), ChatMessage("user", ("Bye",))]
    assert render(GEMMA, chat) == (  # the template's <bos> is dropped: tokenization adds it
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert render(CHATML, chat[1:2]) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_tools_reach_the_template() -> None:
    source = "{% if tools %}{% for t in tools %}[{{ t['function']['name'] }}]{% endfor %}" \
             "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    user = [ChatMessage("user", ("x",))]
    assert render(source, user, tools=tools) == "[get_weather]x"
    assert render(source, user) == "x"


def test_template_for_settings_as_doctor_asks(tmp_path: Path) -> None:
    from server.config import Settings

    settings = Settings(model=tmp_path / "m.gguf", chat_template="chatml", stop=["###"])
    chosen = template_for(settings, {"tokenizer.chat_template": OWN})
    assert (chosen.name, chosen.source) == ("chatml", "config")
    assert chosen.stops[-1] == "###"
    assert template_for(Settings(model=tmp_path / "m.gguf"), GEMMA3).name == "gemma"


def test_glm_4_layout_family_and_stops() -> None:
    """GLM-4 / GLM-4V: [gMASK]<sop> once, role markers with a newline, tool turns as
    <|observation|>; a glm4 GGUF without a template gets it; a GLM GGUF's own template (which
    opens with [gMASK]<sop>) stops where a new turn would open."""
    text = render(GLM_4, [ChatMessage("system", ("Be brief.",)),
                          ChatMessage("user", ("What is this?",)),
                          ChatMessage("assistant", ("A cat.",)), ChatMessage("tool", ("42",))])
    assert text == ("[gMASK]<sop><|system|>\nBe brief.<|user|>\nWhat is this?"
                    "<|assistant|>\nA cat.<|observation|>\n42<|assistant|>\n")
    for arch in ("glm4", "glm4moe"):
        chosen = resolve_template(None, {"general.architecture": arch})
        assert (chosen.name, chosen.source) == ("glm-4", "family")
    own = resolve_template(None, {"tokenizer.chat_template": "[gMASK]<sop>{{ messages }}"})
    assert own.stops == ("<|user|>", "<|observation|>", "<|system|>")
