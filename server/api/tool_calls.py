"""`tools` / `tool_choice` on chat completions: what the model is shown, the grammar its
answer must match, and the answer turned back into OpenAI `tool_calls` (server/engine/tools
has the format, the grammar and the parser)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from server.api.errors import APIError
from server.api.protocol import (
    ChatCompletionRequest,
    ChatMessageIn,
    FilePart,
    ImagePart,
    NamedToolChoice,
    ToolCallIn,
    ToolDef,
)
from server.api.reasoning import ReasoningEvent
from server.api.response_format import answer_schema
from server.api.shown_logprobs import Span, StreamedLogprobs, shown_logprobs
from server.engine import DoneEvent, EngineEvent, ImageInput, TokenEvent
from server.engine.constraints import ConstraintError
from server.engine.tools import (
    RESULT_CLOSE,
    RESULT_OPEN,
    ArgumentsDelta,
    CallStart,
    Delta,
    Function,
    TextDelta,
    ToolCall,
    ToolCallParser,
    call_markup,
    check_functions,
    parse_answer,
    tool_prompt,
    tools_grammar,
)


@dataclass(frozen=True)
class ToolSet:
    """What the model is shown: the functions it may call, and whether it must call one."""

    functions: list[Function]
    required: bool
    # The schema a final answer takes, shown in the tool prompt (a JSON response format
    # beside tools `auto`; None with calls required, which leave no answer to shape).
    answer: Mapping[str, Any] | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class ToolPlan(ToolSet):
    grammar: str  # what the answer must match
    # Calls or a JSON document (a schema for the final answer beside tools `auto`): the
    # parser shows a document as it comes, holding nothing back for a marker in a string.
    json_answer: bool = False


@dataclass(frozen=True)
class ToolDeltaEvent:
    """A stream chunk's `delta` that isn't plain text: tool-call pieces."""

    delta: dict[str, object]


async def plan_tools(body: ChatCompletionRequest) -> ToolPlan | None:
    """None when the model is not to call anything; else what it may call, or a 400."""
    return await plan_functions(body.tools, body.tool_choice, body.parallel_tool_calls,
                                answer=answer_schema(body.response_format),
                                answer_param="response_format.json_schema.schema")


async def plan_functions(tools: list[ToolDef] | None,
                         choice: Literal["none", "auto", "required"] | NamedToolChoice | None,
                         parallel_calls: bool | None, *, answer: Mapping[str, Any] | None,
                         answer_param: str) -> ToolPlan | None:
    """plan_tools for any API that names functions the chat way (responses convert theirs).
    `answer`: the JSON schema a final answer must match (a JSON response format), checked
    always but enforced only where the model may answer instead of calling (`auto`)."""
    offered = offered_tools(tools, choice)
    if offered is None:
        return None
    parallel = parallel_calls is not False
    with _schema_errors():
        # Off the event loop: many large parameter schemas make a large grammar.
        grammar = await asyncio.to_thread(tools_grammar, offered.functions, parallel=parallel,
                                          required=offered.required, answer=answer,
                                          answer_param=answer_param)
    shown = None if offered.required else answer
    return ToolPlan(offered.functions, offered.required, grammar, answer=shown,
                    json_answer=shown is not None)


def shown_tools(tools: list[ToolDef] | None,
                choice: Literal["none", "auto", "required"] | NamedToolChoice | None,
                answer: Mapping[str, Any] | None = None) -> ToolSet | None:
    """The tools as a prompt shows them, for a route that only renders it (/tokenize): the
    requests plan_functions refuses are refused alike, but no grammar is built (tens of
    milliseconds for a few large schemas, thrown away). Only what the built grammar alone
    tells (a schema the converter fails on, a grammar over its size cap) passes here."""
    offered = offered_tools(tools, choice)
    if offered is not None:
        with _schema_errors():
            check_functions(offered.functions)
        if answer is not None and not offered.required:
            offered = replace(offered, answer=answer)
    return offered


def offered_tools(tools: list[ToolDef] | None,
                  choice: Literal["none", "auto", "required"] | NamedToolChoice | None
                  ) -> ToolSet | None:
    """None when the model is not to call anything; else what it may call, or a 400 (the
    parameters' schemas are not checked here)."""
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if choice == "none":
        return None
    functions = [Function(t.function.name, t.function.description or "",
                          t.function.parameters or {"type": "object", "properties": {}})
                 for t in tools]
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
    return ToolSet(functions, required)


@contextmanager
def _schema_errors() -> Iterator[None]:
    """A schema the grammar cannot enforce as a 400 naming it."""
    try:
        yield
    except ConstraintError as exc:
        param = str(exc).split(":", 1)[0]
        raise APIError(400, str(exc), param=param, code="unsupported_schema") from None


def tool_history(messages: list[ChatMessageIn], plan: ToolSet | None) -> list[ChatMessageIn]:
    """The conversation as the chat template can show it: earlier calls as call markup in
    their assistant turn, tool results as user turns, the tool prompt in the system turn.

    Tool results are user turns (as Qwen2.5's template shows them) because no template
    here has a tool turn every model reads (vicuna drops a `tool` message; gemma's and
    chatml's would show a role the model may never have seen), and a user turn is where
    every template places images."""
    return with_tool_prompt(calls_as_text(messages), plan)


def calls_as_text(messages: list[ChatMessageIn]) -> list[ChatMessageIn]:
    """tool_history without the tool prompt: one message out for each message in. A tool
    result with images stays a `tool` message until they are decoded: server.api.messages
    then makes it the user turn (result_parts)."""
    out: list[ChatMessageIn] = []
    for i, message in enumerate(messages):
        if message.role == "function":  # the deprecated form: named by the function
            message = ChatMessageIn(role="tool", content=message.content,
                                    tool_call_id=message.name or "function")
        elif message.function_call is not None:
            if message.role != "assistant":
                raise APIError(400, f"messages.{i}.function_call: only assistant messages make "
                               "calls", param=f"messages.{i}.function_call")
            message = ChatMessageIn(role=message.role, content=message.content, tool_calls=[
                ToolCallIn(id="function", type="function", function=message.function_call)])
        if message.role == "tool":
            if message.tool_call_id is None:
                raise APIError(400, f"messages.{i}.tool_call_id: a tool message must name the "
                               "call it answers", param=f"messages.{i}.tool_call_id")
            if _has_images(message):  # made a user turn once decoded: result_parts
                out.append(message)
                continue
            text = _text_of(message)
            out.append(ChatMessageIn(role="user", content=f"{RESULT_OPEN}\n{text}\n"
                                     f"{RESULT_CLOSE}"))
        elif message.tool_calls:
            if message.role != "assistant":
                raise APIError(400, f"messages.{i}.tool_calls: only assistant messages make "
                               "calls", param=f"messages.{i}.tool_calls")
            if _has_images(message):  # as anywhere but user turns and tool results
                raise APIError(400, f"messages.{i}.content: images are only accepted in user "
                               "messages and tool results", param=f"messages.{i}.content")
            calls = "\n".join(call_markup(c.function.name, c.function.arguments)
                              for c in message.tool_calls)
            text = _text_of(message)
            out.append(ChatMessageIn(role="assistant",
                                     content=f"{text}\n{calls}" if text else calls))
        else:
            out.append(message)
    return out


def result_parts(parts: tuple[str | ImageInput, ...]) -> tuple[str | ImageInput, ...]:
    """A tool result that holds images (a screenshot), decoded, as its user turn's parts:
    the text and the images in the markers a text result has, joined as a user message's
    parts are, each image where the template puts a user's."""
    return (RESULT_OPEN, *parts, RESULT_CLOSE)


def _has_images(message: ChatMessageIn) -> bool:
    return isinstance(message.content, list) and any(
        isinstance(part, ImagePart | FilePart) for part in message.content)


def with_tool_prompt(messages: list[ChatMessageIn], plan: ToolSet | None
                     ) -> list[ChatMessageIn]:
    """The tool prompt appended to the system turn, or a system turn of its own first."""
    if plan is None:
        return messages
    out = list(messages)
    prompt = tool_prompt(plan.functions, plan.required, plan.answer)
    if out and out[0].role in ("system", "developer") and isinstance(out[0].content, str):
        out[0] = ChatMessageIn(role=out[0].role, content=f"{out[0].content}\n\n{prompt}")
    else:
        out.insert(0, ChatMessageIn(role="system", content=prompt))
    return out


def _text_of(message: ChatMessageIn) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    return "".join(getattr(part, "text", "") for part in message.content)


def answer_message(text: str, finish_reason: str,
                   logprobs: Sequence[dict[str, object]] = (), spans: Sequence[Span] = (),
                   *, json_answer: bool = False
                   ) -> tuple[dict[str, object], str, list[dict[str, object]]]:
    """A finished answer as the response's `message`, its finish_reason, and its content's
    token logprobs (of `logprobs`, the tokens at `spans` in `text`): what its stream shows,
    joined (tool_stream), wherever max_tokens cuts it. `json_answer`: as ToolPlan's."""
    parsed = parse_answer(text, cut=finish_reason == "length", json_answer=json_answer)
    message: dict[str, object] = {"role": "assistant", "content": parsed.content}
    if parsed.calls:
        message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.name, "arguments": c.arguments}} for c in parsed.calls]
    shown = shown_logprobs(logprobs, spans, parsed.shown, len(text))
    return message, calls_finish(finish_reason, parsed.calls), shown


def calls_finish(finish_reason: str, calls: Sequence[ToolCall]) -> str:
    """`tool_calls` for an answer that ended on whole calls; an answer cut inside one keeps
    the engine's reason (`length`), its last call's arguments unfinished, as OpenAI's."""
    if calls and finish_reason == "stop" and all(c.complete for c in calls):
        return "tool_calls"
    return finish_reason


async def tool_stream(events: AsyncIterator[EngineEvent | ReasoningEvent],
                      json_answer: bool = False) -> AsyncIterator[
        EngineEvent | ToolDeltaEvent | ReasoningEvent]:
    """The engine's events with call markup turned into `delta.tool_calls` pieces (the
    answer's text only: reasoning passes through); token logprobs go with the text shown
    (server/api/shown_logprobs.py). `json_answer`: as ToolPlan's."""
    parser = ToolCallParser(json_answer)
    logprobs = StreamedLogprobs()
    async for event in events:
        if isinstance(event, TokenEvent):
            logprobs.token(event.text, event.logprob)
            for piece in _as_events(parser.feed(event.text), logprobs):
                yield piece
            logprobs.settle(parser.consumed)
        elif isinstance(event, DoneEvent):
            for piece in _as_events(parser.finish(cut=event.finish_reason == "length"),
                                    logprobs):
                yield piece
            for piece in logprobs.rest():
                yield piece
            if calls_finish(event.finish_reason, parser.calls) == "tool_calls":
                event = replace(event, finish_reason="tool_calls")
            yield event
        else:
            yield event


def _as_events(deltas: list[Delta], logprobs: StreamedLogprobs
               ) -> list[TokenEvent | ToolDeltaEvent]:
    out: list[TokenEvent | ToolDeltaEvent] = []
    for delta in deltas:
        if isinstance(delta, TextDelta):
            out += logprobs.text(delta)
        elif isinstance(delta, CallStart):
            out.append(ToolDeltaEvent({"tool_calls": [{
                "index": delta.index, "id": delta.call.id, "type": "function",
                "function": {"name": delta.call.name, "arguments": ""}}]}))
        else:
            assert isinstance(delta, ArgumentsDelta)
            out.append(ToolDeltaEvent({"tool_calls": [{
                "index": delta.index, "function": {"arguments": delta.text}}]}))
    return out
