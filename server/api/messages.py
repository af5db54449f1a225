"""OpenAI messages → engine messages, decoding images off the event loop."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from server.api.errors import APIError
from server.api.protocol import ChatMessageIn, ImagePart
from server.config import Settings
from server.engine import ImageInput
from server.engine.types import ChatMessage
from server.images import ImageError, decode_image_reference
from server.timings import StageTimer


async def to_engine_messages(
    messages: list[ChatMessageIn], settings: Settings, timer: StageTimer
) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    n_images = 0
    for m_index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if message.content is None:
            out.append(ChatMessage(role, ("",)))
            continue
        if isinstance(message.content, str):
            out.append(ChatMessage(role, (message.content,)))
            continue
        parts: list[str | ImageInput] = []
        for p_index, part in enumerate(message.content):
            if not isinstance(part, ImagePart):
                parts.append(part.text)
                continue
            param = f"messages.{m_index}.content.{p_index}.image_url"
            if role != "user":
                raise APIError(400, f"{param}: images are only accepted in user messages",
                               param=param)
            n_images += 1
            if n_images > settings.max_images_per_request:
                raise APIError(400, f"too many images (limit {settings.max_images_per_request})",
                               param=param)
            parts.append(await _decode(part.image_url.url, settings, timer, param))
        out.append(ChatMessage(role, tuple(parts)))
    return out


async def _decode(url: str, settings: Settings, timer: StageTimer, param: str) -> ImageInput:
    try:
        image = await run_in_threadpool(decode_image_reference, url, settings.image_max_side)
    except ImageError as exc:
        raise APIError(400, f"{param}: {exc}", param=param, code="invalid_image") from None
    timer.images += 1
    timer.add("image_decode", image.decode_s)
    timer.add("image_resize", image.resize_s)
    return ImageInput(image.rgb, image.width, image.height, image.content_hash)
