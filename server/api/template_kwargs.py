"""`chat_template_kwargs`: a request's own variables for the chat template (as in vLLM and
llama-server), e.g. `{"enable_thinking": false}`.

Values are rendered by the template as its own markup, the only text from which special
tokens may come (server/engine/prompt.py), so they are held to what templates use them
for: switches and short words ("high", "auto"), never text that could spell a control
token. Names the template is given by the server are refused, not overridden."""

from __future__ import annotations

import re
from typing import Any

from server.api.errors import APIError
from server.engine.prompt import RESERVED, ChatTemplate

_WORD = re.compile(r"^[A-Za-z0-9_.:/ -]{0,64}$")
MAX_KWARGS = 16


def template_kwargs(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """The variables, checked; a 400 naming the first one refused."""
    if not raw:
        return None
    if len(raw) > MAX_KWARGS:
        raise APIError(400, f"chat_template_kwargs: at most {MAX_KWARGS} variables",
                       param="chat_template_kwargs")
    for name, value in raw.items():
        param = f"chat_template_kwargs.{name}"
        if name in RESERVED or not name.isidentifier():
            raise APIError(400, f"{param}: not a variable a request may set (the server "
                           "gives the template its messages, tools and special tokens)",
                           param=param)
        if not (value is None or isinstance(value, bool | int | float)
                or (isinstance(value, str) and _WORD.match(value))):
            raise APIError(400, f"{param}: a boolean, a number, null or a short word "
                           "(letters, digits, _ . : / - and spaces, at most 64)", param=param)
    return raw


# OpenAI's efforts above "high" (GPT-5.x's): templates know low, medium and high.
_TEMPLATE_EFFORT = {"xhigh": "high", "max": "high"}


def with_reasoning_effort(kwargs: dict[str, Any] | None, effort: str | None,
                          template: ChatTemplate | None) -> dict[str, Any] | None:
    """OpenAI's `reasoning_effort` as the template's own switches, where it has them (the
    client's chat_template_kwargs win): `reasoning_effort` itself (gpt-oss style
    templates read it, as vLLM passes it), and "none" as `enable_thinking: false`
    (Qwen3, GLM-4.5V/4.6V style). A template with neither ignores it, as vLLM does."""
    if effort is None or template is None:
        return kwargs
    effort = _TEMPLATE_EFFORT.get(effort, effort)
    out = dict(kwargs or {})
    if "reasoning_effort" in template.variables:
        out.setdefault("reasoning_effort", effort)
    if effort == "none" and "enable_thinking" in template.variables:
        out.setdefault("enable_thinking", False)
    return out or None
