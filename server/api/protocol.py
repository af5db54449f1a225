"""The OpenAI schema as plain pydantic models (no serving logic).

Requests are validated with these. Responses are built by the routes (the token path is
formatted by hand, for speed); these models document them in /openapi.json, and the schema
tests (tests/test_schema_fuzz.py) check every response the server gives against them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

# Clients send fields we do not use (user, service_tier, ...): ignore, don't fail. Types are strict,
# as the schema says and as OpenAI's API does: "stream": 1 or "max_tokens": "5" is a 400.
_REQUEST_CONFIG = ConfigDict(extra="ignore", strict=True)


def _whole_number(value: object) -> object:
    """JSON has one number type: 18.0 is the integer 18 (as JSON Schema says); 18.5 is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Constraints go before the validator, or the schema shows pydantic's "ge" for "minimum".
_WHOLE = BeforeValidator(_whole_number)


# OpenAI's nullable booleans (the SDK sends `stream=None` as null): null is the default.
_NULLABLE_BOOL = WithJsonSchema({"anyOf": [{"type": "boolean"}, {"type": "null"}]})
NullIsFalse = Annotated[bool, BeforeValidator(lambda v: False if v is None else v),
                        _NULLABLE_BOOL]
NullIsTrue = Annotated[bool, BeforeValidator(lambda v: True if v is None else v),
                       _NULLABLE_BOOL]

# An image's `detail`: OpenAI's "original" (no downscaling) is served as "high", the
# largest this model takes.
ImageDetail = Literal["auto", "low", "high", "original"]


class _Lenient(BaseModel):
    model_config = _REQUEST_CONFIG


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str
    detail: ImageDetail | None = None


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


class FileRef(_Lenient):
    file_id: str = Field(max_length=128)
    # vlserve extension (image_url parts carry it in OpenAI's schema): the upload's `detail`.
    detail: ImageDetail | None = None


class FilePart(_Lenient):
    """An uploaded image (POST /files), as in OpenAI's chat `file` content part."""

    type: Literal["file"]
    file: FileRef


ContentPart = Annotated[TextPart | ImagePart | FilePart, Field(discriminator="type")]


# Images and files only in user messages and tool results (a tool that returns a screenshot;
# shown as the user turn tool results are, server/api/tool_calls.py): checked by the route,
# which says so; declared here.
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_TEXT_ONLY = {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART},
                        {"type": "null"}]}


# Bounds on a conversation's shape, checked before its parts are validated one by one:
# validating (then rendering) 200,000 messages held the event loop for seconds. A chat that
# fits any context is far inside them.
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 4096  # list-content parts, over all messages


class FunctionCallIn(_Lenient):
    name: str
    arguments: str  # a JSON text, as the API returned it


class ToolCallIn(_Lenient):
    """A call an earlier assistant turn made (sent back in the conversation)."""

    id: str
    type: Literal["function"]
    function: FunctionCallIn


class ChatMessageIn(_Lenient):
    model_config = ConfigDict(**_REQUEST_CONFIG, json_schema_extra={
        "if": {"properties": {"role": {"not": {"enum": ["user", "tool", "function"]}}}},
        "then": {"properties": {"content": _TEXT_ONLY}},
    })
    # "function": a deprecated function's result (read as a tool turn).
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns only
    tool_call_id: str | None = None  # tool turns: the call this result answers
    function_call: FunctionCallIn | None = None  # the deprecated form of one tool call


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionDef(_Lenient):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of type object
    strict: bool | None = None  # the parameters are always enforced exactly, or refused


class ToolDef(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(_Lenient):
    include_usage: bool = False


_STOP_LIST = {"type": "array", "items": {"type": "string"}, "maxItems": 4}


class JSONSchemaFormat(_Lenient):
    name: str = Field(max_length=64)
    description: str | None = None
    # `schema` would shadow a BaseModel attribute: the field is aliased.
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced exactly, or refused


class TextFormat(_Lenient):
    type: Literal["text"]


class JSONObjectFormat(_Lenient):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(_Lenient):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaResponseFormat,
                           Field(discriminator="type")]


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
# OpenAI's tiers ("auto", "default", "flex", "priority", ... new ones come): any name is
# accepted, since every request runs at the one tier there is.
ServiceTier = Annotated[str, StringConstraints(max_length=64)]
Verbosity = Literal["low", "medium", "high"]  # GPT-5's; this model has only its own

# OpenAI's: at most 16 pairs, keys up to 64 characters, values up to 512.
Metadata = Annotated[dict[Annotated[str, StringConstraints(max_length=64)],
                          Annotated[str, StringConstraints(max_length=512)]],
                     Field(max_length=16)]


class GenerationFields(_Lenient):
    """What chat and text completions both ask of the sampler and the answer."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1), _WHOLE] | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)  # 0: the likeliest token only
    top_k: Annotated[int, Field(ge=0), _WHOLE] | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: Annotated[int, _WHOLE] | None = None
    # At most 4 (checked by the route, which names the field in its error; declared here).
    stop: str | Annotated[list[str], WithJsonSchema(_STOP_LIST)] | None = None
    # At most n_parallel (checked by the route, which knows it; 128 bounds the schema).
    n: Annotated[int, Field(ge=1, le=128), _WHOLE] | None = None
    stream: NullIsFalse = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool | None = None  # extension (as in vLLM / llama.cpp): run to max_tokens
    # Token id (of this model's vocabulary, as llama-server and vLLM read it) → a bias
    # from -100 (never) to 100 added to its logit; checked by the route, which knows the
    # vocabulary's size.
    logit_bias: dict[str, float] | None = None


class PredictionContent(_Lenient):
    """OpenAI's Predicted Outputs: text the answer is expected to be mostly (a file to
    edit, say). The answer stays the model's own; a good prediction makes it faster
    (server/engine/prediction.py)."""

    type: Literal["content"]
    content: str | list[TextPart]


def predicted_text(prediction: PredictionContent | None) -> str | None:
    if prediction is None:
        return None
    content = prediction.content
    return content if isinstance(content, str) else "".join(part.text for part in content)


class ChatCompletionRequest(GenerationFields):
    # top_logprobs needs logprobs: true (checked by the route; declared here).
    model_config = ConfigDict(**_REQUEST_CONFIG, json_schema_extra={
        "if": {"required": ["top_logprobs"],
               "properties": {"top_logprobs": {"type": "integer"}}},
        "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
    })

    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Annotated[int, Field(ge=1), _WHOLE] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20), _WHOLE] | None = None
    response_format: ResponseFormat | None = None
    # Audio answers (gpt-4o-audio's): refused by the route, not silently answered in text.
    modalities: list[Literal["text", "audio"]] | None = Field(None, max_length=2)
    audio: dict[str, Any] | None = None
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # The deprecated form of tools (server/api/legacy_functions.py): one call, answered as
    # `message.function_call`.
    functions: list[FunctionDef] | None = Field(None, min_length=1, max_length=128)
    function_call: Literal["none", "auto"] | FunctionName | None = None
    # Extension (as in vLLM and llama-server): variables for the chat template, such as
    # {"enable_thinking": false} for a thinking model's template.
    chat_template_kwargs: dict[str, Any] | None = None
    # OpenAI's values; reaches a thinking model's template (server/api/template_kwargs.py).
    reasoning_effort: ReasoningEffort | None = None
    # Keep the completion, its messages and metadata for GET /chat/completions
    # (server/api/stored_chat.py); metadata is checked (and ignored) without store.
    store: bool | None = None
    metadata: Metadata | None = None
    prediction: PredictionContent | None = None
    # Accepted and answered as "default" (server/api/unserved.py); a web search, or a
    # verbosity other than "medium", is a 400 rather than silently not done.
    service_tier: ServiceTier | None = None
    verbosity: Verbosity | None = None
    web_search_options: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _few_enough_parts(cls, data: Any) -> Any:
        """Count content parts on the raw JSON, before pydantic builds a model for each."""
        return few_enough_parts(data, "messages")


def few_enough_parts(data: Any, field: str) -> Any:
    """At most MAX_CONTENT_PARTS list-content parts over the messages (or items: a
    function_call_output's `output` parts too) in `data[field]`, counted on the raw JSON."""
    messages = data.get(field) if isinstance(data, dict) else None
    if isinstance(messages, list) and len(messages) <= MAX_MESSAGES:
        parts = sum(len(m[key]) for m in messages if isinstance(m, dict)
                    for key in ("content", "output") if isinstance(m.get(key), list))
        if parts > MAX_CONTENT_PARTS:
            raise PydanticCustomError(
                "too_long", "{field}: at most {limit} content parts in all, not {n}",
                {"field": field, "limit": MAX_CONTENT_PARTS, "n": parts})
    return data


class CompletionRequest(GenerationFields):
    """OpenAI's (legacy) text completions: one prompt, no chat template."""

    # 0 with echo and logprobs scores the prompt and generates nothing (evaluation
    # harnesses measure a text's likelihood this way).
    max_tokens: Annotated[int, Field(ge=0), _WHOLE] | None = None

    # A string, token ids, or a list of either (checked by the route, which names the
    # offending item).
    prompt: str | list[Any]
    best_of: Annotated[int, Field(ge=1, le=128), _WHOLE] | None = None  # = n only
    logprobs: Annotated[int, Field(ge=0, le=20), _WHOLE] | None = None
    echo: NullIsFalse = False
    suffix: str | None = None  # refused unless empty: no fill-in-the-middle here


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int  # a thinking model's tokens up to the end of its reasoning
    # Predicted Outputs: draft tokens of `prediction` the answer kept, and those it did not.
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


# Per-stage timings in ms plus token counts (see the README): queue, image_decode, ...
Timings = dict[str, float]
FinishReason = Literal["stop", "length", "tool_calls", "function_call"]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None  # null when the answer is only tool calls
    tool_calls: list[ToolCallOut] | None = None
    function_call: FunctionCallOut | None = None  # instead of tool_calls, for `functions`
    # A thinking model's reasoning (between its think markers), apart from the answer.
    reasoning_content: str | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None  # the first chunk of a call: id, type and name
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None  # null unless the request asked for logprobs


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    timings: Timings
    service_tier: Literal["default"] | None = None  # only when the request named one


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    function_call: FunctionCallDelta | None = None  # instead of tool_calls, for `functions`
    reasoning_content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a stream. The usage chunk has no choices."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    timings: Timings | None = None
    service_tier: Literal["default"] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    meta: dict[str, Any]  # where layers and projector run, context size, warm-up time, ...


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed"]  # processed: the vision encoder has run
    width: int | None = None  # images only (not batch JSONL files)
    height: int | None = None
    expires_at: int | None = None  # None: kept until deleted


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class Health(BaseModel):
    status: Literal["ok", "loading", "draining", "failed", "stopped"]
    error: str | None = None  # why the engine failed or stopped


class Live(BaseModel):
    status: Literal["alive"]
    engine: str  # loading, warming, ok, draining, failed or stopped


class Load(BaseModel):
    load: int  # requests running plus waiting


class SlotState(BaseModel):
    id: int
    state: Literal["idle", "prefill", "generating"]
    request_id: str | None
    n_past: int
    generated_tokens: int


class Slots(BaseModel):
    queue_depth: int
    busy_slots: int
    preencode_backlog: int  # uploads waiting for an idle engine to encode them (at most 16)
    slots: list[SlotState]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    # null for a prompt's first token with `echo` (nothing predicts it), as OpenAI's legacy
    # API and vLLM answer (the SDK's type says float there).
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None


class Completion(BaseModel):
    """The answer, or (`stream: true`) one `data:` event of it."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    timings: Timings | None = None
