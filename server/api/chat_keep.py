"""`store: true` on POST /chat/completions: the completion is kept once it is whole (a
stream's, put together from the chunks the client got, before its `[DONE]`), with the
request's messages and metadata (server.api.chat_store). A completion that failed midway
is not kept; one the store cannot take is answered all the same, and logged."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from server.api.chat_store import stored_chat
from server.api.generation import usage_of
from server.api.protocol import ChatCompletionRequest
from server.api.state import AppState
from server.store import StateUnavailable
from server.timings import StageTimer

logger = logging.getLogger("vlserve.api")

DONE = "data: [DONE]\n\n"


class Keeper:
    """What a `store: true` request keeps, and where."""

    def __init__(self, state: AppState, body: ChatCompletionRequest, client: str) -> None:
        self.state = state
        self.client = client
        self.messages = body.messages
        self.metadata = body.metadata or {}
        self.logprobs = bool(body.logprobs)

    async def keep(self, completion: dict[str, Any]) -> None:
        """Store the whole completion; a failure is logged, never the request's."""
        # Off the event loop: sizing the messages means serialising their images.
        entry = await asyncio.to_thread(stored_chat, completion, self.client, self.metadata,
                                        self.messages)
        try:
            kept = await self.state.chat_store.add(entry)
        except StateUnavailable as exc:  # the answer is (being) sent: say so here
            logger.error("chat completion %s not stored: %s", entry.id, exc)
            return
        if not kept:
            logger.warning("chat completion %s not stored: over the per-key byte share",
                           entry.id)

    async def stream(self, lines: AsyncIterator[str], timer: StageTimer
                     ) -> AsyncIterator[str]:
        """`lines` as they are, the completion they make kept just before `[DONE]` (so a
        client that read the stream to its end can read it back at once)."""
        assembly: StreamAssembly | None = StreamAssembly(logprobs=self.logprobs)
        async with contextlib.aclosing(lines):  # a client gone: the generation stops now
            async for line in lines:
                try:
                    if assembly is not None and line == DONE:
                        await self.keep(assembly.completion(timer))
                    elif assembly is not None:
                        assembly.add(line)
                except Exception:  # a bug here must not cut the client's stream short
                    logger.exception("chat completion stream not stored")
                    assembly = None
                yield line


def keeper(state: AppState, body: ChatCompletionRequest, client: str) -> Keeper | None:
    """The request's Keeper; None unless it asked for `store`."""
    return Keeper(state, body, client) if body.store else None


class StreamAssembly:
    """A stream's chunks put together as the chat.completion they add up to (what the
    SDK's stream helpers make of them): texts and call arguments appended, per choice."""

    def __init__(self, *, logprobs: bool) -> None:
        self.head: dict[str, Any] = {}
        self.tier: dict[str, str] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.logprobs = logprobs
        self.usage: dict[str, Any] | None = None
        self.timings: dict[str, Any] | None = None

    def add(self, line: str) -> None:
        chunk = json.loads(line.removeprefix("data: "))
        if "error" in chunk:  # failed midway: the stream ends without [DONE], unkept
            return
        if not self.head:
            self.head = {"id": chunk["id"], "object": "chat.completion",
                         "created": chunk["created"], "model": chunk["model"]}
            # Last, where the whole answer has it (server/api/chat.py).
            if "service_tier" in chunk:
                self.tier = {"service_tier": chunk["service_tier"]}
        if chunk.get("usage") is not None:  # the usage chunk (include_usage)
            self.usage, self.timings = chunk["usage"], chunk.get("timings")
        for part in chunk["choices"]:
            choice = self.choices.setdefault(part["index"], {
                "index": part["index"], "message": {"role": "assistant", "content": None},
                "finish_reason": None, "logprobs": {"content": []} if self.logprobs else None})
            _merge(choice["message"], part["delta"])
            if part["finish_reason"] is not None:
                choice["finish_reason"] = part["finish_reason"]
            if choice["logprobs"] is not None and part.get("logprobs"):
                choice["logprobs"]["content"] += part["logprobs"]["content"]

    def completion(self, timer: StageTimer) -> dict[str, Any]:
        """The chat.completion, usage and timings as a non-streaming answer has them (the
        usage chunk's, when the stream had one)."""
        choices = [self.choices[index] for index in sorted(self.choices)]
        for choice in choices:
            message = choice["message"]
            if ("tool_calls" in message or "function_call" in message) \
                    and not (message["content"] or "").strip():
                message["content"] = None  # as a call-only answer's content is
        return {**self.head, "choices": choices,
                "usage": self.usage if self.usage is not None else usage_of(timer),
                "timings": self.timings if self.timings is not None else timer.as_dict(),
                **self.tier}


def _merge(message: dict[str, Any], delta: dict[str, Any]) -> None:
    for key, value in delta.items():
        if key in ("content", "reasoning_content"):
            message[key] = (message.get(key) or "") + value
        elif key == "tool_calls":
            calls: list[dict[str, Any]] = message.setdefault("tool_calls", [])
            for piece in value:
                if piece["index"] == len(calls):  # its first piece: id, type and name
                    calls.append({"id": piece["id"], "type": piece["type"],
                                  "function": {"name": piece["function"]["name"],
                                               "arguments": ""}})
                calls[piece["index"]]["function"]["arguments"] += \
                    piece["function"]["arguments"]
        elif key == "function_call":
            call = message.setdefault("function_call", {"name": "", "arguments": ""})
            call["name"] = value.get("name") or call["name"]
            call["arguments"] += value["arguments"]
        else:  # role
            message[key] = value
