"""The table of known chat templates, and which one a model gets.

Each entry is the Jinja text plus the markers that open the next turn: a model that writes
one has finished its answer and is inventing the user's reply, so generation stops there
(Ollama ships per-template stop lists for the same reason). Order of resolution: the
`chat_template` setting (a name from this table, a .jinja file or inline Jinja), then the
GGUF's own tokenizer.chat_template, then the entry for the GGUF's architecture, then vicuna.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.config import Settings

# LLaVA-1.5 / Vicuna v1.1: what LLaVA GGUFs (which carry no template) were trained on, and
# what base models answer best to.
VICUNA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

CHATML = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Gemma has no system role: a system message opens the first user turn.
GEMMA = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% else %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ message['content'] }}<end_of_turn>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Youtu-VL-4B-Instruct's turn format: every turn opens with <|begin_of_text|> and the role on
# its own line and closes with <|end_of_text|>; a default system turn comes first; images sit
# in the user turn as <|vision_start|><|image_pad|><|vision_end|> right before their text.
# Written from that format (as the HF processor renders it), not copied from the model repo.
# Content given as a string (what vlserve passes, with mtmd's marker where images go) is used
# as is; the list branch mirrors the HF template for typed content. The tokenizer adds no BOS,
# so the template's own leading <|begin_of_text|> is the only one.
YOUTU_VL = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|begin_of_text|>system\nYou are a helpful assistant.<|end_of_text|>\n"
    "{% endif %}"
    "<|begin_of_text|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|end_of_text|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|begin_of_text|>assistant\n{% endif %}"
)


# GLM-4 (GLM-4-0414, GLM-4.1V, GLM-4.5V, GLM-4.6V): "[gMASK]<sop>" once, then each turn as its
# role marker and a newline, nothing closing it; tool results are <|observation|> turns.
# mtmd wraps each glm4v image in <|begin_of_image|> ... <|end_of_image|> itself, so string
# content keeps mtmd's marker; the list branch mirrors the HF template's image tokens.
# Written from that format, not copied from a model repo. The tokenizer adds no BOS.
GLM_4 = (
    "[gMASK]<sop>"
    "{% for message in messages %}"
    "{{ '<|observation|>' if message['role'] == 'tool' else '<|' + message['role'] + '|>' }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class KnownTemplate:
    source: str  # Jinja
    stops: tuple[str, ...]  # text that opens (or closes) a turn: the answer is over
    signature: str  # a template containing this is of this kind (for GGUF and custom ones)


TEMPLATES: dict[str, KnownTemplate] = {
    "vicuna": KnownTemplate(VICUNA, ("\nUSER:", "\nASSISTANT:"), "ASSISTANT:"),
    "chatml": KnownTemplate(CHATML, ("<|im_end|>", "<|im_start|>"), "<|im_start|>"),
    "gemma": KnownTemplate(GEMMA, ("<end_of_turn>", "<start_of_turn>"), "<start_of_turn>"),
    "llama-3": KnownTemplate(LLAMA3, ("<|eot_id|>", "<|start_header_id|>"),
                             "<|start_header_id|>"),
    "youtu-vl": KnownTemplate(YOUTU_VL, ("<|end_of_text|>", "<|begin_of_text|>"),
                              "<|begin_of_text|>"),
    "glm-4": KnownTemplate(GLM_4, ("<|user|>", "<|observation|>", "<|system|>"),
                           "[gMASK]<sop>"),
}
ALIASES = {"llava-1.5": "vicuna", "llava": "vicuna", "qwen": "chatml", "llama3": "llama-3",
           "glm-4v": "glm-4", "glm4v": "glm-4", "glm4": "glm-4"}
DEFAULT = "vicuna"

# general.architecture → the template that family's GGUFs use when they carry none.
FAMILIES = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma",
    "qwen2": "chatml", "qwen2vl": "chatml", "qwen25vl": "chatml", "qwen3": "chatml",
    "llama": "vicuna", "glm4": "glm-4", "glm4moe": "glm-4",
}


@dataclass(frozen=True)
class ResolvedTemplate:
    """The template a model gets, and why (for the startup log and /models meta)."""

    name: str  # a table name, or "gguf", "file" or "inline"
    source: str  # "config", "gguf", "family" or "default"
    template: str  # the Jinja text
    stops: tuple[str, ...]
    reason: str  # one line for people

    def meta(self) -> dict[str, object]:
        return {"name": self.name, "source": self.source, "stops": list(self.stops),
                "reason": self.reason}


class TemplateConfigError(ValueError):
    """chat_template names a .jinja file that cannot be read."""


def known_names() -> list[str]:
    return sorted([*TEMPLATES, *ALIASES])


def resolve_template(chat_template: str | None, metadata: Mapping[str, Any],
                     extra_stops: tuple[str, ...] = ()) -> ResolvedTemplate:
    """Which template serves a model: `chat_template` is the setting (None: unset),
    `metadata` the GGUF's header fields (server.gguf_meta, or the loaded model's);
    `extra_stops` (the preset's `stop`) are added to the template's own."""
    resolved = _resolve(chat_template, metadata)
    if extra_stops:
        stops = tuple(dict.fromkeys((*resolved.stops, *extra_stops)))
        resolved = ResolvedTemplate(resolved.name, resolved.source, resolved.template, stops,
                                    resolved.reason)
    return resolved


def template_for(settings: Settings, metadata: Mapping[str, Any]) -> ResolvedTemplate:
    """The template these settings give a model with this GGUF metadata: what the engine
    loads, and what `vlserve doctor` reports (metadata: server.gguf_meta.read_gguf_metadata).
    Raises TemplateConfigError for a chat_template file that cannot be read."""
    return resolve_template(settings.chat_template, metadata, tuple(settings.stop))


def _resolve(chat_template: str | None, metadata: Mapping[str, Any]) -> ResolvedTemplate:
    if chat_template:
        return _from_setting(chat_template)
    embedded = metadata.get("tokenizer.chat_template")
    if isinstance(embedded, str) and embedded.strip():
        return ResolvedTemplate("gguf", "gguf", embedded, stops_for(embedded),
                                "the GGUF's own tokenizer.chat_template")
    arch = str(metadata.get("general.architecture") or "")
    family = FAMILIES.get(arch)
    if family is not None and family != DEFAULT:
        return _entry(family, "family",
                      f"the GGUF has no chat template; '{family}' is the {arch} family's")
    return _entry(DEFAULT, "default", "the GGUF has no chat template and its architecture "
                  f"({arch or 'unknown'}) has no entry of its own")


def _from_setting(value: str) -> ResolvedTemplate:
    key = value.strip().lower()
    name = ALIASES.get(key, key)
    if name in TEMPLATES:
        return _entry(name, "config", f"chat_template setting names '{value.strip()}'")
    path = Path(value.strip()).expanduser()
    if "{" not in value and (path.suffix in (".jinja", ".j2") or path.is_file()):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TemplateConfigError(f"chat_template file {path}: {exc.strerror}") from None
        return ResolvedTemplate("file", "config", text, stops_for(text),
                                f"chat_template setting points at {path}")
    if "{" not in value:
        raise TemplateConfigError(f"chat_template {value!r} is neither a known template "
                                  f"({', '.join(known_names())}), a .jinja file nor Jinja text")
    return ResolvedTemplate("inline", "config", value, stops_for(value),
                            "chat_template setting holds inline Jinja")


def _entry(name: str, source: str, reason: str) -> ResolvedTemplate:
    known = TEMPLATES[name]
    return ResolvedTemplate(name, source, known.source, known.stops, reason)


def stops_for(template: str) -> tuple[str, ...]:
    """The next-turn markers of a template that is not from the table, recognised by the
    known layouts' signatures (none: the model's end-of-generation tokens alone stop it)."""
    for known in TEMPLATES.values():
        if known.signature in template:
            return known.stops
    return ()
