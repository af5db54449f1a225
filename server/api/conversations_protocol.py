"""The Conversations API schema (POST /conversations and its items) as plain pydantic
models: requests validated with them, answers documented by them (/openapi.json)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from server.api.protocol import _Lenient, few_enough_parts
from server.api.responses_protocol import InputItem, Metadata

# OpenAI adds at most 20 items a call (creating a conversation or adding to one).
MAX_ITEMS_PER_CALL = 20


class _WithItems(_Lenient):
    @model_validator(mode="before")
    @classmethod
    def _few_enough_parts(cls, data: Any) -> Any:
        """As chat's: parts counted on the raw JSON, before a model is built for each."""
        return few_enough_parts(data, "items")


class ConversationCreate(_WithItems):
    items: Annotated[list[InputItem], Field(max_length=MAX_ITEMS_PER_CALL)] | None = None
    metadata: Metadata | None = None


class ConversationUpdate(_Lenient):
    metadata: Metadata | None  # required; null clears it (the SDK's type allows it)


class ItemsCreate(_WithItems):
    items: Annotated[list[InputItem], Field(min_length=1, max_length=MAX_ITEMS_PER_CALL)]


# --- answers -------------------------------------------------------------------------------


class ConversationObject(BaseModel):
    id: str
    object: Literal["conversation"]
    created_at: int
    metadata: dict[str, str]


class ConversationDeleted(BaseModel):
    id: str
    object: Literal["conversation.deleted"]
    deleted: bool


class ConversationItemList(BaseModel):
    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool
