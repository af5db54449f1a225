"""Chat template (from GGUF metadata or config) → prompt text with media markers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.engine.types import ChatMessage, ImageInput


class PromptError(ValueError):
    """The messages cannot be rendered with this model's template."""


@dataclass(frozen=True)
class RenderedPrompt:
    text: str  # one media marker per image, in order
    images: tuple[ImageInput, ...]


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str, eos_token: str, media_marker: str,
                 strip_bos: bool = True, part_separator: str = "\n") -> None:
        """`strip_bos`: drop a BOS the template emits because tokenization adds one (the
        vocab's add_bos); `part_separator` joins a message's text and image parts."""
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise PromptError(f"chat template does not compile: {exc}") from None
        self.source = source
        self._bos = bos_token
        self._eos = eos_token
        self._marker = media_marker
        self._strip_bos = strip_bos
        self._separator = part_separator

    def render(
        self, messages: list[ChatMessage], system_prompt: str | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> RenderedPrompt:
        """`tools`: the request's tool definitions (OpenAI shape), for templates that show
        them; None when the request has none, as HF's apply_chat_template passes them."""
        images: list[ImageInput] = []
        rendered_messages: list[dict[str, Any]] = []
        if system_prompt and not any(m.role == "system" for m in messages):
            rendered_messages.append({"role": "system", "content": system_prompt})
        for message in messages:
            texts: list[str] = []
            for part in message.parts:
                if isinstance(part, ImageInput):
                    images.append(part)
                    texts.append(self._marker)
                else:
                    texts.append(part)
            rendered_messages.append({"role": message.role,
                                      "content": self._separator.join(texts)})
        try:
            text = self._template.render(
                messages=rendered_messages,
                add_generation_prompt=True,
                tools=tools,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except TemplateError as exc:
            raise PromptError(f"chat template failed on these messages: {exc}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            # A template's own expressions can fail on unusual but valid conversations.
            raise PromptError(f"chat template failed on these messages ({type(exc).__name__})"
                              ) from None
        # When tokenization adds BOS, a template that also emits it would double it; when it
        # does not (Youtu-VL: <|begin_of_text|> opens every turn), the template's must stay.
        if self._strip_bos and self._bos and text.startswith(self._bos):
            text = text[len(self._bos):]
        if text.count(self._marker) != len(images):
            raise PromptError("message text must not contain the media marker itself")
        return RenderedPrompt(text, tuple(images))


def _raise_exception(message: str) -> None:
    raise TemplateError(message)
