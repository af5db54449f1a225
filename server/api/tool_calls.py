"""`tools` / `tool_choice` on chat completions: what the model is shown, the grammar its
answer must match, and the answer turned back into OpenAI `tool_calls` (server/engine/tools
has the format, the grammar and the parser)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest, ChatMessageIn, NamedToolChoice
from server.engine import DoneEvent, EngineEvent, TokenEvent
from server.engine.constraints import ConstraintError
from server.engine.tools import (
    ArgumentsDelta,
    CallStart,
    Delta,
    Function,
    TextDelta,
    ToolCallParser,
    call_markup,
    parse_answer,
    tool_prompt,
    tools_grammar,
)


@dataclass(frozen=True)
class ToolPlan:
    functions: list[Function]
    required: bool
    grammar: str


@dataclass(frozen=True)
class ToolDeltaEvent:
    """A stream chunk's `delta` that isn't plain text: tool-call pieces."""

    delta: dict[str, object]


async def plan_tools(body: ChatCompletionRequest) -> ToolPlan | None:
    """None when the model is not to call anything; else what it may call, or a 400."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if choice == "none":
        return None
    functions = [Function(t.function.name, t.function.description or "",
                          t.function.parameters or {"type": "object", "properties": {}})
                 for t in body.tools]
    for i, function in enumerate(functions):
        if function.parameters.get("type", "object") != "object":
            raise APIError(400, f"tools.{i}.function.parameters: must be a schema of type "
                           "object", param=f"tools.{i}.function.parameters")
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: function names must be unique", param="tools")
    required = choice == "required"
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice: no function named {choice.function.name!r} in "
                           "tools", param="tool_choice.function.name")
        functions = [functions[names.index(choice.function.name)]]
        required = True
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "response_format cannot be combined with tools unless "
                       "tool_choice is 'none'", param="response_format")
    parallel = body.parallel_tool_calls is not False
    try:
        # Off the event loop: many large parameter schemas make a large grammar.
        grammar = await asyncio.to_thread(tools_grammar, functions, parallel=parallel,
                                          required=required)
    except ConstraintError as exc:
        param = str(exc).split(":", 1)[0]
        raise APIError(400, str(exc), param=param, code="unsupported_schema") from None
    return ToolPlan(functions, required, grammar)


def tool_history(messages: list[ChatMessageIn], plan: ToolPlan | None) -> list[ChatMessageIn]:
    """The conversation as the chat template can show it: earlier calls as call markup in
    their assistant turn, tool results as user turns, the tool prompt in the system turn."""
    out: list[ChatMessageIn] = []
    for i, message in enumerate(messages):
        if message.role == "tool":
            if message.tool_call_id is None:
                raise APIError(400, f"messages.{i}.tool_call_id: a tool message must name the "
                               "call it answers", param=f"messages.{i}.tool_call_id")
            text = _text_of(message)
            out.append(ChatMessageIn(role="user", content=f"<tool_response>\n{text}\n"
                                     "</tool_response>"))
        elif message.tool_calls:
            if message.role != "assistant":
                raise APIError(400, f"messages.{i}.tool_calls: only assistant messages make "
                               "calls", param=f"messages.{i}.tool_calls")
            calls = "\n".join(call_markup(c.function.name, c.function.arguments)
                              for c in message.tool_calls)
            text = _text_of(message)
            out.append(ChatMessageIn(role="assistant",
                                     content=f"{text}\n{calls}" if text else calls))
        else:
            out.append(message)
    if plan is None:
        return out
    prompt = tool_prompt(plan.functions, plan.required)
    if out and out[0].role in ("system", "developer") and isinstance(out[0].content, str):
        out[0] = ChatMessageIn(role=out[0].role, content=f"{out[0].content}\n\n{prompt}")
    else:
        out.insert(0, ChatMessageIn(role="system", content=prompt))
    return out


def _text_of(message: ChatMessageIn) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    return "".join(getattr(part, "text", "") for part in message.content)


def answer_message(text: str, finish_reason: str) -> tuple[dict[str, object], str]:
    """A finished answer as the response's `message`, and its finish_reason."""
    parsed = parse_answer(text)
    if not parsed.calls:
        return {"role": "assistant", "content": text}, finish_reason
    calls = [{"id": c.id, "type": "function",
              "function": {"name": c.name, "arguments": c.arguments}} for c in parsed.calls]
    message = {"role": "assistant", "content": parsed.content, "tool_calls": calls}
    return message, "tool_calls" if finish_reason == "stop" else finish_reason


async def tool_stream(events: AsyncIterator[EngineEvent]) -> AsyncIterator[
        EngineEvent | ToolDeltaEvent]:
    """The engine's events with call markup turned into `delta.tool_calls` pieces."""
    parser = ToolCallParser()
    async for event in events:
        if isinstance(event, TokenEvent):
            for delta in parser.feed(event.text):
                yield _as_event(delta)
        elif isinstance(event, DoneEvent):
            for delta in parser.finish():
                yield _as_event(delta)
            if parser.calls and event.finish_reason == "stop":
                event = DoneEvent("tool_calls", event.timer)
            yield event
        else:
            yield event


def _as_event(delta: Delta) -> TokenEvent | ToolDeltaEvent:
    if isinstance(delta, TextDelta):
        return TokenEvent(delta.text)
    if isinstance(delta, CallStart):
        return ToolDeltaEvent({"tool_calls": [{
            "index": delta.index, "id": delta.call.id, "type": "function",
            "function": {"name": delta.call.name, "arguments": ""}}]})
    assert isinstance(delta, ArgumentsDelta)
    return ToolDeltaEvent({"tool_calls": [{"index": delta.index,
                                           "function": {"arguments": delta.text}}]})
