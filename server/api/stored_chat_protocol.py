"""Stored chat completions' schema (GET/POST/DELETE /chat/completions/{id}, the listings):
the update request validated with it, the answers documented by it (/openapi.json)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from server.api.protocol import ChatCompletion, Metadata, _Lenient


class ChatCompletionUpdate(_Lenient):
    metadata: Metadata | None  # required; null clears it (the SDK's type allows it)


class StoredChatCompletion(ChatCompletion):
    """The completion as it was answered (a stream's chunks put together), and its
    metadata."""

    metadata: dict[str, str]


class StoredChatCompletionList(BaseModel):
    object: Literal["list"]
    data: list[StoredChatCompletion]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ChatCompletionDeleted(BaseModel):
    id: str
    object: Literal["chat.completion.deleted"]
    deleted: bool


class StoredMessage(BaseModel):
    """One of the request's messages, as OpenAI lists them (ChatCompletionStoreMessage)."""

    id: str  # <completion id>-<index in the request's messages>
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | None  # a list's text parts, joined; its parts are in content_parts
    name: str | None
    content_parts: list[dict[str, Any]] | None  # as sent, when content was a list
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None


class StoredMessageList(BaseModel):
    object: Literal["list"]
    data: list[StoredMessage]
    first_id: str | None
    last_id: str | None
    has_more: bool
