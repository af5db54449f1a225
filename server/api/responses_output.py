"""Engine events → a response object and its output items; streamed, the full Responses
event sequence (response.created ... response.completed), numbered from 0."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from server.api.generation import Event, logprob_entry
from server.api.reasoning import ReasoningEvent
from server.api.responses_input import new_id
from server.api.tool_calls import ToolDeltaEvent
from server.engine import DoneEvent, ErrorEvent, TokenEvent
from server.timings import StageTimer


@dataclass
class ResponseDraft:
    """The response object's fields that don't come from generation (the request's echo)."""

    id: str
    model: str
    echo: dict[str, Any]  # instructions, max_output_tokens, tools, ... as the request set them
    created_at: int = field(default_factory=lambda: int(time.time()))

    def body(self, status: str, output: list[dict[str, Any]], *,
             timer: StageTimer | None = None, finish_reason: str | None = None,
             error: dict[str, str] | None = None) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if finish_reason == "length" else None
        return {"id": self.id, "object": "response", "created_at": self.created_at,
                "model": self.model, "status": status, "output": output, **self.echo,
                "error": error, "incomplete_details": incomplete,
                "usage": usage(timer) if timer is not None else None,
                "timings": timer.as_dict() if timer is not None else None}


def usage(timer: StageTimer) -> dict[str, Any]:
    return {"input_tokens": timer.prompt_tokens,
            # Every evaluated prompt token stays in the slot's KV, reusable by the next turn.
            "input_tokens_details": {"cached_tokens": timer.cached_tokens,
                                     "cache_write_tokens": timer.prompt_tokens
                                     - timer.cached_tokens},
            "output_tokens": timer.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": timer.reasoning_tokens},
            "total_tokens": timer.prompt_tokens + timer.completion_tokens}


def status_of(finish_reason: str) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def message_item(text: str, status: str, item_id: str | None = None,
                 logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "message", "id": item_id or new_id("msg"), "role": "assistant",
            "status": status, "content": [text_part(text, logprobs)]}


def reasoning_item(text: str, status: str, item_id: str | None = None) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id or new_id("rs"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [],
            "logprobs": logprobs or []}


def call_item(call_id: str, name: str, arguments: str, status: str,
              item_id: str | None = None) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id or new_id("fc"), "call_id": call_id,
            "name": name, "arguments": arguments, "status": status}


def answer_items(content: str | None, calls: list[dict[str, Any]], status: str,
                 logprobs: list[dict[str, Any]] | None = None, reasoning: str = ""
                 ) -> list[dict[str, Any]]:
    """Output items of a finished answer, as its stream closes them (stream_events): its
    reasoning (if any), its text (if any, or if there are no calls), then each call
    (chat-style tool_calls, from server.api.tool_calls.answer_message). An item that
    another follows is `completed`; the last (a call cut short too) has the answer's
    `status`, and so has reasoning followed by nothing of an answer (no text, call or
    token logprob: the stream opens no item for a token that shows none of them)."""
    items = [message_item(content or "", status, logprobs=logprobs)] \
        if content or not calls else []
    items += [call_item(c["id"], c["function"]["name"], c["function"]["arguments"], status)
              for c in calls]
    for item in items[:-1]:
        item["status"] = "completed"
    if reasoning:
        begun = bool(content or calls or logprobs)
        items.insert(0, reasoning_item(reasoning, "completed" if begun else status))
    return items


class EventStream:
    """Numbers and formats server-sent events; `sequence_number` counts up from 0."""

    def __init__(self, start: int = 0) -> None:
        self.sequence = start

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


@dataclass
class Finished:
    """How a stream ended: the final response body (None when it failed)."""

    body: dict[str, Any] | None = None
    output: list[dict[str, Any]] = field(default_factory=list)
    error_status: int | None = None  # the engine's HTTP status for a failure
    # A failure's response object, as the last event sends it (on_done may change it).
    failed: dict[str, Any] | None = None


def queued_events(draft: ResponseDraft, out: EventStream) -> list[str]:
    """A background response's opening, sent before the engine admits it (as OpenAI's:
    created and queued, both `queued`); `stream_events(..., out)` goes on from there."""
    body = draft.body("queued", [])
    return [out.event("response.created", response=body),
            out.event("response.queued", response=body)]


async def stream_events(draft: ResponseDraft, first: Event, events: AsyncIterator[Event],
                        on_done: Callable[[Finished], Awaitable[None]],
                        opened: EventStream | None = None) -> AsyncIterator[str]:
    """The event sequence of one response; `on_done` gets its end (to store it, log it).
    `opened`: the numbering of a stream whose opening (queued_events) went out already."""
    out = opened or EventStream()
    output: list[dict[str, Any]] = []  # finished items
    if opened is None:
        yield out.event("response.created", response=draft.body("in_progress", []))
    yield out.event("response.in_progress", response=draft.body("in_progress", []))
    text: dict[str, Any] | None = None  # the message item being written
    call: dict[str, Any] | None = None  # the function call being written
    thought: dict[str, Any] | None = None  # the reasoning item being written

    def close_open(status: str = "completed") -> list[str]:
        nonlocal text, call, thought
        lines: list[str] = []
        index = len(output)
        if thought is not None:
            body = thought["content"][0]["text"]
            lines.append(out.event("response.reasoning_text.done", item_id=thought["id"],
                                   output_index=index, content_index=0, text=body))
            thought["status"] = status
            lines.append(out.event("response.output_item.done", output_index=index,
                                   item=thought))
            output.append(thought)
            thought = None
        if text is not None:
            part = text["content"][0]
            item_id, body, logprobs = text["id"], part["text"], part["logprobs"]
            lines.append(out.event("response.output_text.done", item_id=item_id,
                                   output_index=index, content_index=0, text=body,
                                   logprobs=logprobs))
            lines.append(out.event("response.content_part.done", item_id=item_id,
                                   output_index=index, content_index=0, part=part))
            text["status"] = status
            lines.append(out.event("response.output_item.done", output_index=index, item=text))
            output.append(text)
            text = None
        if call is not None:
            lines.append(out.event("response.function_call_arguments.done", item_id=call["id"],
                                   output_index=index, name=call["name"],
                                   arguments=call["arguments"]))
            call["status"] = status
            lines.append(out.event("response.output_item.done", output_index=index, item=call))
            output.append(call)
            call = None
        return lines

    def open_text() -> list[str]:
        nonlocal text
        text = message_item("", "in_progress")
        item = {**text, "content": []}
        return [out.event("response.output_item.added", output_index=len(output), item=item),
                out.event("response.content_part.added", item_id=text["id"],
                          output_index=len(output), content_index=0, part=text_part(""))]

    event = first
    while True:
        if isinstance(event, ReasoningEvent):
            if thought is None:
                for line in close_open():
                    yield line
                thought = reasoning_item("", "in_progress")
                yield out.event("response.output_item.added", output_index=len(output),
                                item={**thought, "content": []})
            thought["content"][0]["text"] += event.text
            yield out.event("response.reasoning_text.delta", item_id=thought["id"],
                            output_index=len(output), content_index=0, delta=event.text)
        elif isinstance(event, TokenEvent) and not event.text and event.logprob is None:
            pass  # part of a character: nothing to show yet (answer_items agrees)
        elif isinstance(event, TokenEvent):
            if text is None:
                for line in close_open() + open_text():
                    yield line
            assert text is not None
            part = text["content"][0]
            part["text"] += event.text
            logprobs = [logprob_entry(event.logprob)] if event.logprob is not None else []
            part["logprobs"] += logprobs
            yield out.event("response.output_text.delta", item_id=text["id"],
                            output_index=len(output), content_index=0, delta=event.text,
                            logprobs=logprobs)
        elif isinstance(event, ToolDeltaEvent):
            piece = event.delta["tool_calls"][0]  # type: ignore[index]
            function = piece["function"]
            if "id" in piece:  # a new call
                for line in close_open():
                    yield line
                call = call_item(piece["id"], function["name"], "", "in_progress")
                yield out.event("response.output_item.added", output_index=len(output),
                                item=dict(call))
            elif call is not None:
                call["arguments"] += function["arguments"]
                yield out.event("response.function_call_arguments.delta", item_id=call["id"],
                                output_index=len(output), delta=function["arguments"])
        elif isinstance(event, DoneEvent):
            status = status_of(event.finish_reason)
            if text is None and call is None and not any(
                    item["type"] != "reasoning" for item in output):
                # An empty answer is an empty message; reasoning still open ends as it did.
                for line in close_open(status) + open_text():
                    yield line
            for line in close_open(status):
                yield line
            body = draft.body(status, output, timer=event.timer,
                              finish_reason=event.finish_reason)
            await on_done(Finished(body, output))
            kind = "response.completed" if status == "completed" else "response.incomplete"
            yield out.event(kind, response=body)
            return
        else:
            assert isinstance(event, ErrorEvent)
            for line in close_open("incomplete"):  # what was written stays, cut short
                yield line
            failed = draft.body("failed", output,
                                error={"code": "server_error", "message": event.message})
            await on_done(Finished(None, output, event.status, failed))
            yield out.event("response.failed", response=failed)
            return
        event = await anext(events)
