"""OpenAI's deprecated `functions` / `function_call`, served as the tools they became.

Older clients (and libraries built on them) still send `functions` and read
`message.function_call`; ignored, they would get a plain answer and never their call. The
request becomes a one-call `tools` request, and the answer goes back in the old shape:
`function_call` instead of `tool_calls`, finish_reason `function_call`. The conversation's
old-style turns (`role: "function"`, an assistant's `function_call`) are read where tool
turns are (server/api/tool_calls.calls_as_text).
"""

from __future__ import annotations

from typing import Literal

from server.api.errors import APIError
from server.api.protocol import (
    ChatCompletionRequest,
    FunctionDef,
    FunctionName,
    NamedToolChoice,
    ToolDef,
)

LegacyChoice = Literal["none", "auto"] | FunctionName
ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def as_tools(body: ChatCompletionRequest) -> ChatCompletionRequest:
    """The request with `functions` / `function_call` as `tools` / `tool_choice`; as sent
    when it has none."""
    if body.functions is None and body.function_call is None:
        return body
    tools, tool_choice = legacy_tools(body.functions, body.function_call, body.tools,
                                      body.tool_choice)
    return body.model_copy(update={
        "tools": tools, "tool_choice": tool_choice,
        "parallel_tool_calls": False,  # the old shape holds one call
        "functions": None, "function_call": None,
    })


def legacy_tools(functions: list[FunctionDef] | None, function_call: LegacyChoice | None,
                 tools: list[ToolDef] | None, tool_choice: ToolChoice | None
                 ) -> tuple[list[ToolDef] | None, ToolChoice | None]:
    """`tools` and `tool_choice` for a request that may use the deprecated fields."""
    if functions is None:
        if function_call is not None:
            raise APIError(400, "function_call needs functions", param="function_call")
        return tools, tool_choice
    if tools is not None or tool_choice is not None:
        raise APIError(400, "functions (deprecated) and tools cannot be combined; send tools",
                       param="functions")
    if not (function_call is None or isinstance(function_call, str)) \
            and function_call.name not in {f.name for f in functions}:
        raise APIError(400, f"function_call: no function named {function_call.name!r} in "
                       "functions", param="function_call.name")
    return ([ToolDef(type="function", function=f) for f in functions],
            function_call if function_call is None or isinstance(function_call, str) else
            NamedToolChoice(type="function", function=FunctionName(name=function_call.name)))


def legacy_message(message: dict[str, object], finish_reason: str
                   ) -> tuple[dict[str, object], str]:
    """A finished answer's message and finish_reason in the old shape."""
    calls = message.pop("tool_calls", None)
    if not calls:
        return message, finish_reason
    assert isinstance(calls, list)
    message["function_call"] = calls[0]["function"]
    return message, legacy_finish(finish_reason)


def legacy_delta(delta: dict[str, object]) -> dict[str, object] | None:
    """A streamed tool-call piece in the old shape (None: a piece of a second call, which
    the one-call grammar does not let the model write)."""
    calls = delta.get("tool_calls")
    if not isinstance(calls, list):
        return delta
    (call,) = calls
    if call["index"] != 0:
        return None
    return {"function_call": call["function"]}


def legacy_finish(finish_reason: str) -> str:
    return "function_call" if finish_reason == "tool_calls" else finish_reason
