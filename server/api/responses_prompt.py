"""The prompt a Responses request builds, for POST /responses and for counting it (POST
/responses/input_tokens): the earlier turns (a stored response's conversation, or a
conversation's items), `instructions`, the input items, as the chat messages the chat path
renders, with the tool prompt; its tools and `text.format` planned as chat plans them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from server.api.errors import APIError
from server.api.messages import to_engine_messages
from server.api.protocol import (
    ChatMessageIn,
    FunctionDef,
    FunctionName,
    JSONObjectFormat,
    JSONSchemaResponseFormat,
    NamedToolChoice,
    ToolDef,
)
from server.api.response_format import answer_schema, response_grammar
from server.api.response_store import StoredResponse
from server.api.responses_input import items_from_store, to_chat_messages
from server.api.responses_protocol import (
    InputItem,
    ResponsesRequest,
    TextFormatJSONObject,
    TextFormatJSONSchema,
)
from server.api.state import AppState
from server.api.template_kwargs import with_reasoning_effort
from server.api.tool_calls import ToolPlan, calls_as_text, plan_functions, with_tool_prompt
from server.api.truncation import fit_conversation, image_cut
from server.engine import ChatMessage, GenerationRequest
from server.engine.prompt import ChatTemplate


@dataclass(frozen=True)
class OutputPlan:
    """What shapes the answer: the tools (prompt and call grammar) or the text format's
    grammar, as chat's `tools` and `response_format` would."""

    tools: ToolPlan | None
    constraint: tuple[str, str] | None  # (kind, GBNF grammar); None: free text


@dataclass(frozen=True)
class ResponsePrompt:
    messages: list[ChatMessageIn]  # with the tool prompt
    # Where each message's content came from, for errors ("input.2.content",
    # "conversation.0.output", "instructions", "tools").
    where: list[str]
    user_turns: list[bool]  # a user's own turn: where truncation may cut
    template_kwargs: dict[str, Any] | None
    n_earlier: int  # items from the earlier turns, before the input's

    def without(self, fixed: int, cut: int) -> ResponsePrompt:
        """The prompt less its messages fixed … cut - 1 (whole turns, by image_cut)."""
        def keep(values: list[Any]) -> list[Any]:
            return values[:fixed] + values[cut:]
        return replace(self, messages=keep(self.messages), where=keep(self.where),
                       user_turns=keep(self.user_turns))

    def item_index(self, message: int) -> int:
        """The conversation index (earlier items, then the input's) of the item message
        `message` came from."""
        origin, index = self.where[message].split(".")[:2]
        return int(index) + (self.n_earlier if origin == "input" else 0)


@dataclass(frozen=True)
class FittedPrompt:
    """A prompt as `truncation: "auto"` leaves it."""

    prompt: ResponsePrompt  # less the turns cut for their images
    messages: list[ChatMessage]  # decoded, less the turns cut for their tokens
    first_kept: int | None  # in prompt.messages: the first kept after the leading system ones
    fixed: int  # the leading system messages (instructions, tool prompt), always kept

    def kept_items(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation's items (earlier turns, then the input) a next turn goes on
        from: the leading system items, then those from the first kept on."""
        if self.first_kept is None:
            return items
        prompt = self.prompt
        system = [items[prompt.item_index(i)] for i in range(self.fixed)
                  if prompt.where[i] not in ("instructions", "tools")]
        return system + items[prompt.item_index(self.first_kept):]


async def fit_prompt(state: AppState, prompt: ResponsePrompt, generation: GenerationRequest,
                     client: str) -> FittedPrompt:
    """The oldest whole turns dropped until the images left are allowed (before any is
    decoded) and the prompt leaves the answer its max_tokens (server.api.truncation)."""
    cut = image_cut(prompt.messages, prompt.user_turns, state.settings.max_images_per_request)
    if cut is not None:
        prompt = prompt.without(*cut)
    assert generation.timer is not None
    converted = await to_engine_messages(prompt.messages, state, generation.timer, client,
                                         prompt.where)
    fitted = await fit_conversation(state, converted, prompt.user_turns, generation)
    first_kept = fitted.first_kept if fitted.first_kept is not None else (
        fitted.fixed if cut is not None else None)
    return FittedPrompt(prompt, fitted.messages, first_kept, fitted.fixed)


def check_continuation(body: ResponsesRequest) -> None:
    if body.conversation is not None and body.previous_response_id is not None:
        raise APIError(400, "conversation: not with previous_response_id (a conversation "
                       "holds its own earlier turns)", param="conversation")


async def owned_response(state: AppState, response_id: str | None, client: str, param: str,
                         *, items: bool = True) -> StoredResponse | None:
    """The client's stored response `response_id` (None when not asked); 404 when gone.
    Without its items unless `items` (then one whose items were lost, evicted from the
    shared store, is gone too)."""
    if response_id is None:
        return None
    store = state.responses
    stored = await (store.get if items else store.head)(response_id, client)
    if stored is None or (items and stored.conversation is None):
        raise response_not_found(response_id, param)
    return stored


async def previous_response(state: AppState, body: ResponsesRequest, client: str
                            ) -> StoredResponse | None:
    """The response `previous_response_id` continues: one that has ended (a background
    response still running has no answer to continue from yet)."""
    previous = await owned_response(state, body.previous_response_id, client,
                                    "previous_response_id")
    if previous is not None and previous.status in ("queued", "in_progress"):
        raise APIError(400, f"previous_response_id: {previous.id} is still "
                       f"{previous.status}; continue it once it has ended",
                       param="previous_response_id", code="response_not_finished")
    return previous


def response_not_found(response_id: str, param: str) -> APIError:
    return APIError(404, f"{param}: no stored response with id {response_id!r} (unknown, "
                    "deleted, expired, or stored with store: false)", param=param,
                    code="response_not_found")


async def plan_output(body: ResponsesRequest) -> OutputPlan:
    tools = await _plan_tools(body)
    constraint = ("tools", tools.grammar) if tools else await response_grammar(
        chat_format(body), param="text.format.schema")
    return OutputPlan(tools, constraint)


def build_prompt(body: ResponsesRequest, earlier_items: list[dict[str, Any]], origin: str,
                 items: list[InputItem], tools: ToolPlan | None,
                 template: ChatTemplate | None) -> ResponsePrompt:
    """`origin` names the earlier items in errors (previous_response_id, conversation)."""
    earlier = items_from_store(earlier_items)
    if not earlier and not items:
        raise APIError(400, "input: at least one item (or a previous_response_id or a "
                       "conversation with items to continue)", param="input")
    names = [f"{origin}.{i}" for i in range(len(earlier))]
    messages, where = to_chat_messages(earlier + items,
                                       names + [f"input.{i}" for i in range(len(items))])
    if body.instructions is not None:
        messages.insert(0, ChatMessageIn(role="system", content=body.instructions))
        where.insert(0, "instructions")
    user_turns = [m.role == "user" for m in messages]  # before tool results become user turns
    messages = calls_as_text(messages)
    prompted = with_tool_prompt(messages, tools)
    added = len(prompted) - len(messages)
    kwargs = with_reasoning_effort(None, body.reasoning.effort if body.reasoning else None,
                                   template)
    return ResponsePrompt(prompted, ["tools"] * added + where, [False] * added + user_turns,
                          kwargs, len(earlier))


async def _plan_tools(body: ResponsesRequest) -> ToolPlan | None:
    """Responses' flat function tools, planned as chat's (same prompt, grammar, errors)."""
    tools = [ToolDef(type="function", function=FunctionDef(
        name=t.name, description=t.description, parameters=t.parameters, strict=t.strict))
        for t in body.tools or []]
    choice = body.tool_choice
    chat_choice = NamedToolChoice(type="function", function=FunctionName(name=choice.name)) \
        if choice is not None and not isinstance(choice, str) else choice
    try:
        return await plan_functions(tools, chat_choice, body.parallel_tool_calls,
                                    answer=answer_schema(chat_format(body)),
                                    answer_param="text.format.schema")
    except APIError as exc:
        # Named the chat way (tools.0.function.parameters): say it as this request spells it.
        if exc.param is not None and exc.param.startswith(("tools.", "tool_choice.")):
            flat = exc.param.replace(".function.", ".", 1)
            exc.message = exc.message.replace(exc.param, flat, 1)
            exc.param = flat
        raise


def chat_format(body: ResponsesRequest) -> JSONObjectFormat | JSONSchemaResponseFormat | None:
    """`text.format` as chat's response_format (None: free text)."""
    fmt = body.text.format if body.text is not None else None
    if isinstance(fmt, TextFormatJSONObject):
        return JSONObjectFormat(type="json_object")
    if isinstance(fmt, TextFormatJSONSchema):
        return JSONSchemaResponseFormat(type="json_schema", json_schema=fmt)
    return None
