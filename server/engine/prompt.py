"""Chat template (from GGUF metadata or config) → prompt text with media markers.

The rendered prompt comes back as segments that say which text the template wrote (its
markup: the only place special tokens may come from) and which the client wrote (tokenized
as plain text, so a user who types `</s>` or the media marker gets those characters)."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import TemplateError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.engine.types import ChatMessage, ImageInput

# A thinking model's reasoning markers (DeepSeek-R1, Qwen3, GLM-4.1V/4.5V/4.6V, ...).
THINK = ("<think>", "</think>")


class PromptError(ValueError):
    """The messages cannot be rendered with this model's template."""


@dataclass(frozen=True)
class Segment:
    text: str
    user: bool  # written by a client (or the operator's system prompt): never special


@dataclass(frozen=True)
class RenderedPrompt:
    # In order; the template's markup holds one media marker per image, user text none.
    segments: tuple[Segment, ...]
    images: tuple[ImageInput, ...]

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


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
            # The variables it reads: request options that map onto a template's own
            # switches (reasoning_effort) are passed only to templates that have them.
            self.variables = frozenset(meta.find_undeclared_variables(env.parse(source)))
        except TemplateError as exc:
            raise PromptError(f"chat template does not compile: {exc}") from None
        self.source = source
        self._bos = bos_token
        self._eos = eos_token
        self._marker = media_marker
        self._strip_bos = strip_bos
        self._separator = part_separator
        self._opens: dict[str, bool] = {}  # opens_thinking's answers, by kwargs

    def render(
        self, messages: list[ChatMessage], system_prompt: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> RenderedPrompt:
        """`tools`: the request's tool definitions (OpenAI shape), for templates that show
        them; None when the request has none, as HF's apply_chat_template passes them.
        `template_kwargs`: the request's own template variables (enable_thinking: False),
        never one of RESERVED (server/api/template_kwargs.py checks)."""
        # Client text goes in between two sentinels no client can guess (a fresh nonce each
        # time), so the rendered text says where it is, whatever the template wraps around it.
        # Digits and ASCII control characters: case filters and trim leave them as they are,
        # and ASCII text stays one byte a character.
        nonce = f"\x02{secrets.randbits(64):020d}"
        sentinels = (f"{nonce}[", f"{nonce}]")

        def wrap(text: str) -> str:
            return f"{sentinels[0]}{text}{sentinels[1]}" if text else text

        images: list[ImageInput] = []
        rendered_messages: list[dict[str, Any]] = []
        if system_prompt and not any(m.role == "system" for m in messages):
            rendered_messages.append({"role": "system", "content": wrap(system_prompt)})
        for message in messages:
            texts: list[str] = []
            for part in message.parts:
                if isinstance(part, ImageInput):
                    images.append(part)
                    texts.append(self._marker)
                else:
                    texts.append(wrap(part))
            rendered_messages.append({"role": message.role,
                                      "content": self._separator.join(texts)})
        try:
            text = self._template.render(
                **(template_kwargs or {}),
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
        segments = split_segments(text, sentinels)
        markers = sum(s.text.count(self._marker) for s in segments if not s.user)
        if markers != len(images):
            raise PromptError("the chat template did not place every image of the messages")
        return RenderedPrompt(segments, tuple(images))

    @property
    def thinks(self) -> bool:
        """A thinking model's template: it knows the reasoning markers (to drop earlier
        turns' reasoning, or to open or close the block in the generation prompt)."""
        return all(marker in self.source for marker in THINK)

    def opens_thinking(self, template_kwargs: dict[str, Any] | None) -> bool:
        """Whether the generation prompt leaves <think> open (the answer begins inside the
        reasoning), with these template variables."""
        key = json.dumps(template_kwargs or {}, sort_keys=True)
        known = self._opens.get(key)
        if known is not None:
            return known
        try:
            text = self.render([ChatMessage("user", ("?",))],
                               template_kwargs=template_kwargs).segments[-1].text
        except PromptError:
            text = ""
        start, end = THINK
        opened = text.rfind(start) > text.rfind(end)
        if len(self._opens) >= 256:  # a few distinct kwargs in practice; never unbounded
            self._opens.clear()
        self._opens[key] = opened
        return opened


RESERVED = frozenset({"messages", "add_generation_prompt", "tools", "bos_token", "eos_token",
                      "raise_exception", "strftime_now"})


def split_segments(text: str, sentinels: tuple[str, str]) -> tuple[Segment, ...]:
    """Cut rendered text at the sentinels into markup and user segments (sentinels dropped).

    A template that cuts into message content (e.g. keeps what follows a `</think>`) can leave
    a sentinel without its partner: the text on the open side of a stray sentinel, up to the
    previous one, is then taken as user text. A template that altered a sentinel (the nonce
    is still there, its frame is not) makes all of the prompt user text. Erring that way only
    costs the template's markup its special meaning, never gives a client's text one."""
    opening, closing = sentinels
    nonce = opening[:-1]
    out: list[Segment] = []
    inside = False
    start = 0
    while True:  # str.find, not a regex: linear and fast on a 50 MB prompt
        at = text.find(nonce, start)
        if at < 0:
            break
        piece = text[start:at]
        if piece:
            out.append(Segment(piece, inside))
        if text.startswith(opening, at):
            inside = True
        elif not text.startswith(closing, at):
            return (Segment(text.replace(opening, "").replace(closing, ""), True),)
        elif inside:
            inside = False
        elif piece:  # a closing sentinel that lost its opening one
            out[-1] = Segment(piece, True)
        start = at + len(opening)
    if start < len(text):
        out.append(Segment(text[start:], inside))
    digits = nonce[1:]
    if any(digits in s.text for s in out if not s.user):  # a sentinel escaped or cut apart
        return (Segment(text.replace(opening, "").replace(closing, ""), True),)
    return tuple(_merge(out))


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbours of the same kind (joined once per run: linear in the text)."""
    runs: list[tuple[bool, list[str]]] = []
    for segment in segments:
        if runs and runs[-1][0] == segment.user:
            runs[-1][1].append(segment.text)
        else:
            runs.append((segment.user, [segment.text]))
    return [Segment("".join(texts), user) for user, texts in runs]


def _raise_exception(message: str) -> None:
    raise TemplateError(message)
