"""Responses input items → the chat messages the chat path already knows how to render
(images decoded and uploads resolved by server.api.messages, calls shown by
server.api.tool_calls); and items as they are stored and listed."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from pydantic import TypeAdapter

from server.api.errors import APIError
from server.api.protocol import (
    ChatMessageIn,
    ContentPart,
    FilePart,
    FileRef,
    FunctionCallIn,
    ImagePart,
    ImageURL,
    TextPart,
    ToolCallIn,
)
from server.api.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputFile,
    InputImage,
    InputItem,
    InputText,
    MessageItem,
    OutputText,
    ReasoningItem,
    ResponsesRequest,
)

_ITEMS: TypeAdapter[list[InputItem]] = TypeAdapter(list[InputItem])


def request_items(body: ResponsesRequest) -> list[InputItem]:
    """`input` as items: a string is one user message."""
    if body.input is None:
        return []
    if isinstance(body.input, str):
        return [MessageItem(role="user", content=body.input)]
    return list(body.input)


def items_from_store(stored: list[dict[str, Any]]) -> list[InputItem]:
    """Items read back from the response store (written by `item_dicts`)."""
    return _ITEMS.validate_python(stored, strict=False)


def to_chat_messages(items: list[InputItem], names: list[str]
                     ) -> tuple[list[ChatMessageIn], list[str]]:
    """Chat messages for `items`, each with the name of the item field its content came
    from (for errors: `input.0.content`, `input.2.output`): function calls join the
    assistant turn before them, call outputs become tool turns."""
    messages: list[ChatMessageIn] = []
    where: list[str] = []
    for item, name in zip(items, names, strict=True):
        if isinstance(item, ReasoningItem):
            continue  # not shown again: templates drop earlier reasoning as well
        if isinstance(item, FunctionCallOutputItem):
            messages.append(ChatMessageIn(role="tool", tool_call_id=item.call_id,
                                          content=_output(item, name)))
            where.append(f"{name}.output")
            continue
        if isinstance(item, FunctionCallItem):
            call = ToolCallIn(id=item.call_id, type="function",
                              function=FunctionCallIn(name=item.name, arguments=item.arguments))
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                messages[-1] = last.model_copy(update={"tool_calls": [*(last.tool_calls or []),
                                                                       call]})
                continue
            messages.append(ChatMessageIn(role="assistant", tool_calls=[call]))
            where.append(f"{name}.arguments")  # shown as call markup, the turn's content
        else:
            messages.append(ChatMessageIn(role=item.role, content=_content(item, name)))
            where.append(f"{name}.content")
    return messages, where


def _content(item: MessageItem, name: str) -> str | list[ContentPart]:
    if isinstance(item.content, str):
        return item.content
    texts = [p.text for p in item.content if isinstance(p, InputText | OutputText)]
    if len(texts) == len(item.content) == 1:
        return texts[0]  # one text part renders exactly as a string (a stored answer does)
    parts: list[ContentPart] = []
    for index, part in enumerate(item.content):
        if isinstance(part, InputText | OutputText):
            parts.append(TextPart(type="text", text=part.text))
        else:
            parts.append(_image(part, f"{name}.content.{index}"))
    return parts


def _output(item: FunctionCallOutputItem, name: str) -> str | list[ContentPart]:
    """A call's output as its tool turn's content: text parts and images, as a user
    message's (server.api.tool_calls shows it as a user turn)."""
    if isinstance(item.output, str):
        return item.output
    parts: list[ContentPart] = []
    for index, part in enumerate(item.output):
        param = f"{name}.output.{index}"
        if isinstance(part, InputText):
            parts.append(TextPart(type="text", text=part.text))
        elif isinstance(part, InputImage):
            parts.append(_image(part, param))
        else:
            raise APIError(400, f"{param}: input_file parts are not supported (this server "
                           "reads text and images); send the file's text as input_text",
                           param=param, code="unsupported_content")
    return parts


def _image(part: InputImage, param: str) -> ImagePart | FilePart:
    if (part.image_url is None) == (part.file_id is None):
        raise APIError(400, f"{param}: an input_image needs exactly one of image_url and "
                       "file_id", param=param)
    if part.file_id is not None:
        return FilePart(type="file", file=FileRef(file_id=part.file_id, detail=part.detail))
    assert part.image_url is not None
    return ImagePart(type="image_url", image_url=ImageURL(url=part.image_url,
                                                           detail=part.detail))


def item_dicts(items: list[InputItem]) -> list[dict[str, Any]]:
    """Items as GET /responses/{id}/input_items lists them: each with an id and a status,
    message content always a list of parts, a call's output as it was sent."""
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, MessageItem):
            kind = "output_text" if item.role == "assistant" else "input_text"
            content = [{"type": kind, "text": item.content}] if isinstance(item.content, str) \
                else _listed(item.content)
            if item.role == "assistant":  # a field OpenAI's item type requires
                for part in content:
                    part.setdefault("annotations", [])
            out.append({"id": new_id("msg"), "type": "message", "role": item.role,
                        "status": "completed", "content": content})
        elif isinstance(item, FunctionCallItem):
            out.append({"id": item.id or new_id("fc"), "type": "function_call",
                        "call_id": item.call_id, "name": item.name,
                        "arguments": item.arguments, "status": "completed"})
        elif isinstance(item, ReasoningItem):
            out.append({"id": item.id or new_id("rs"), "type": "reasoning",
                        "summary": item.summary, "status": "completed",
                        "content": [p.model_dump() for p in item.content or []]})
        else:
            output = item.output if isinstance(item.output, str) else _listed(item.output)
            out.append({"id": item.id or new_id("fco"), "type": "function_call_output",
                        "call_id": item.call_id, "output": output, "status": "completed"})
    return out


def _listed(parts: Sequence[InputText | OutputText | InputImage | InputFile]
            ) -> list[dict[str, Any]]:
    """Parts as sent, with the `detail` OpenAI's listed input_image requires."""
    listed = [p.model_dump(exclude_none=True) for p in parts]
    for part in listed:
        if part["type"] == "input_image":
            part.setdefault("detail", "auto")
    return listed


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"
