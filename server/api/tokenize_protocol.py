"""POST /tokenize and /detokenize bodies, in vLLM's shape (llama-server serves the same
routes with other field names): a prompt or a chat's messages in, token ids out, and back."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.api.protocol import (
    MAX_MESSAGES,
    ChatMessageIn,
    FunctionDef,
    FunctionName,
    NamedToolChoice,
    ReasoningEffort,
    ResponseFormat,
    ToolDef,
    few_enough_parts,
)

MAX_DETOKENIZE = 1 << 20  # ids in one request: far beyond any context, bounds the work


class TokenizeRequest(BaseModel):
    """Exactly one of `prompt` (read as POST /completions reads it) and `messages` (rendered
    as POST /chat/completions renders them: chat template, server system prompt, tools,
    images)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    # With the BOS/EOS the tokenizer adds around every prompt (the model reads them; usage
    # counts them).
    add_special_tokens: bool = True
    return_token_strs: bool = False
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    functions: list[FunctionDef] | None = Field(None, min_length=1, max_length=128)
    function_call: Literal["none", "auto"] | FunctionName | None = None  # as chat's
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None  # as chat's: it may change the prompt
    # As chat's: beside tools, a JSON format's schema is shown in the tool prompt.
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _few_enough_parts(cls, data: Any) -> Any:
        return few_enough_parts(data, "messages")


class TokenizeResponse(BaseModel):
    count: int = Field(description="Positions the prompt takes in the context (text and "
                       "image tokens): its usage.prompt_tokens")
    max_model_len: int = Field(description="The context size (n_ctx) per request")
    tokens: list[int] = Field(description="The text tokens' ids in order; image positions "
                              "have embeddings, not ids, and are counted in image_tokens")
    token_strs: list[str] | None = Field(
        description="Each text token's own text (control tokens written out), with "
        "return_token_strs")
    image_tokens: int


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE)


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="The ids' text as the vocabulary joins them, control "
                        "tokens written out")
