"""The Responses API schema (POST /responses and its stored objects) as plain pydantic
models: requests validated with them, answers documented by them (/openapi.json)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, StringConstraints, Tag, model_validator

from server.api.protocol import (
    _WHOLE,
    FUNCTION_NAME,
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    ImageDetail,
    JSONSchemaFormat,
    Metadata,
    NullIsFalse,
    NullIsTrue,
    ReasoningEffort,
    ServiceTier,
    Timings,
    Verbosity,
    _Lenient,
    few_enough_parts,
)

# --- requests ------------------------------------------------------------------------------


class InputText(_Lenient):
    type: Literal["input_text"]
    text: str


class OutputText(_Lenient):
    """An earlier answer's text, sent back as input (assistant messages)."""

    type: Literal["output_text"]
    text: str


class InputImage(_Lenient):
    """An image by data URL (`image_url`) or by upload (`file_id`, POST /files): one of the
    two. `detail` sizes it as in chat completions (server.api.image_detail)."""

    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = Field(None, max_length=128)
    detail: ImageDetail | None = None


InputContent = Annotated[InputText | OutputText | InputImage, Field(discriminator="type")]


class InputFile(_Lenient):
    """OpenAI's file part, read only to be refused by name (server.api.responses_input):
    this server reads text and images."""

    type: Literal["input_file"]


# A function's output as parts: a tool that returns an image (a screenshot) for the model
# to look at, as OpenAI's ResponseFunctionCallOutputItemList.
OutputContent = Annotated[InputText | InputImage | InputFile, Field(discriminator="type")]


class MessageItem(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[InputContent], Field(max_length=MAX_CONTENT_PARTS)]


class FunctionCallItem(_Lenient):
    """A call an earlier answer made (as the output item it came as)."""

    type: Literal["function_call"]
    call_id: str = Field(max_length=128)
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Lenient):
    type: Literal["function_call_output"]
    call_id: str = Field(max_length=128)
    output: str | Annotated[list[OutputContent], Field(max_length=MAX_CONTENT_PARTS)]
    id: str | None = None


class ReasoningTextPart(_Lenient):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(_Lenient):
    """A thinking model's reasoning from an earlier answer (apps send the output items back
    as input). Accepted and left out of the prompt: chat templates drop earlier turns'
    reasoning too."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[ReasoningTextPart] | None = None
    encrypted_content: str | None = None
    status: str | None = None


def _item_type(value: Any) -> str | None:
    """Message items may leave out `type` (the SDK's EasyInputMessage)."""
    if isinstance(value, dict):
        return value.get("type", "message" if "role" in value else None)
    return getattr(value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type)]


class ConversationRef(_Lenient):
    """`conversation` on /responses as an object: `{"id": "conv_..."}`."""

    id: Annotated[str, StringConstraints(max_length=128)]


class FunctionTool(_Lenient):
    """A function the model may call (Responses spell it flat: no `function` wrapper)."""

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Lenient):
    type: Literal["function"]
    name: str


class TextFormatText(_Lenient):
    type: Literal["text"]


class TextFormatJSONObject(_Lenient):
    type: Literal["json_object"]


class TextFormatJSONSchema(JSONSchemaFormat):
    type: Literal["json_schema"]


TextFormat = Annotated[TextFormatText | TextFormatJSONObject | TextFormatJSONSchema,
                       Field(discriminator="type")]


class TextConfig(_Lenient):
    format: TextFormat | None = None
    verbosity: Verbosity | None = None  # "medium" only (server/api/unserved.py)


class ReasoningConfig(_Lenient):
    effort: ReasoningEffort | None = None  # as chat's reasoning_effort
    # Summaries are not written: the reasoning comes back whole, as reasoning_text.
    summary: Literal["auto", "concise", "detailed"] | None = None


# OpenAI's `include` values. Those naming tools this server lacks (file search, web search,
# computer use, code interpreter) have nothing to add and are accepted as OpenAI accepts
# them without such a call; `reasoning.encrypted_content` too, since earlier turns' reasoning
# never reaches the prompt (ReasoningItem); `message.input_image.image_url`: input items
# keep their image URLs anyway. Any other value is a 400, as OpenAI's, not silently nothing.
Includable = Literal[
    "file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
    "message.input_image.image_url", "computer_call_output.output.image_url",
    "code_interpreter_call.outputs", "reasoning.encrypted_content",
    "message.output_text.logprobs",
]


class ResponsesRequest(_Lenient):
    model: str | None = None
    # Optional with previous_response_id or conversation: their turns alone are the prompt.
    input: str | Annotated[list[InputItem], Field(max_length=MAX_MESSAGES)] | None = None
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1), _WHOLE] | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    stream: NullIsFalse = False
    store: NullIsTrue = True
    # Answered at once (status "queued"), generated detached from the request: poll
    # GET /responses/{id}, stream it (now or later), cancel it (server/api/background.py).
    background: NullIsFalse = False
    previous_response_id: str | None = Field(None, max_length=128)
    metadata: Metadata | None = None
    # Continue (and extend) a stored conversation (POST /conversations); not with
    # previous_response_id.
    conversation: Annotated[str, StringConstraints(max_length=128)] | ConversationRef | None = None
    # "auto": a conversation longer than the context loses its oldest turns
    # (server/api/truncation.py); "disabled" (the default): it is a 400.
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: ReasoningConfig | None = None
    # Logprobs of the answer's text: `include: ["message.output_text.logprobs"]` (or a
    # `top_logprobs`, which says how many alternatives each token shows).
    include: list[Includable] | None = Field(None, max_length=16)
    top_logprobs: Annotated[int, Field(ge=0, le=20), _WHOLE] | None = None
    service_tier: ServiceTier | None = None  # answered as "default"

    @model_validator(mode="before")
    @classmethod
    def _few_enough_parts(cls, data: Any) -> Any:
        """As chat's: parts counted on the raw JSON, before a model is built for each."""
        return few_enough_parts(data, "input")


# --- answers -------------------------------------------------------------------------------


class OutputTextPart(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[Any] = []


class OutputMessage(BaseModel):
    type: Literal["message"]
    id: str
    role: Literal["assistant"]
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputTextPart]


class FunctionCallOut(BaseModel):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class ReasoningOut(BaseModel):
    """A thinking model's reasoning (its text between the think markers), before the
    answer's message."""

    type: Literal["reasoning"]
    id: str
    summary: list[Any]
    content: list[ReasoningTextPart]
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = Annotated[OutputMessage | FunctionCallOut | ReasoningOut,
                       Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int  # read from the KV prefix cache (earlier turns, shared prefixes)
    cache_write_tokens: int  # evaluated now, and kept for the next turn


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    """A response; `timings` is vlserve's extension (as on chat completions)."""

    id: str
    object: Literal["response"]
    created_at: float
    model: str
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
    output: list[OutputItem]
    instructions: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    tools: list[dict[str, Any]]
    tool_choice: Any
    parallel_tool_calls: bool
    text: dict[str, Any]
    store: bool
    background: bool
    previous_response_id: str | None
    metadata: dict[str, str] | None
    conversation: dict[str, str] | None  # {"id": ...}: the conversation it continued
    truncation: Literal["auto", "disabled"]
    reasoning: dict[str, Any] | None  # the request's, repeated
    top_logprobs: int | None
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    usage: ResponseUsage | None
    timings: Timings | None = None
    service_tier: Literal["default"] | None = None  # only when the request named one


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"]
    deleted: bool


class InputItemList(BaseModel):
    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class StreamEvent(BaseModel):
    """One server-sent event: its `type` names it (`response.created`,
    `response.output_text.delta`, ...), `sequence_number` counts up from 0."""

    type: str
    sequence_number: int

