"""OpenAI messages → engine messages: images decoded off the event loop, uploads resolved."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial

from starlette.concurrency import run_in_threadpool

from server.api.errors import APIError
from server.api.image_detail import size_rule, upload_at
from server.api.internal import batch_image
from server.api.protocol import ChatMessageIn, FilePart, ImagePart, TextPart
from server.api.remote_images import fetch_image_bytes
from server.api.state import AppState
from server.api.tool_calls import result_parts
from server.engine import ImageInput
from server.engine.types import ChatMessage
from server.images import (
    DecodedImage,
    ImageError,
    ImageTooLargeError,
    SizeRule,
    image_bytes_from_url,
)
from server.images.decode import content_hash, decode_planned, plan_decode
from server.timings import StageTimer
from server.uploads import StoredFile, Uploads


async def to_engine_messages(
    messages: list[ChatMessageIn], state: AppState, timer: StageTimer, client: str = "",
    names: Sequence[str] | None = None,
) -> list[ChatMessage]:
    """`client` (server.api.auth.client_identity) may reference its own uploads only;
    `names` says where each message's content came from, for errors (default
    `messages.<i>.content`; a Responses function output's is `input.<i>.output`). A tool
    result here holds images (server.api.tool_calls.calls_as_text): it becomes its user
    turn."""
    settings = state.settings
    out: list[ChatMessage] = []
    n_images = 0
    for m_index, message in enumerate(messages):
        name = names[m_index] if names is not None else f"messages.{m_index}.content"
        role = "system" if message.role == "developer" else message.role
        if message.content is None:
            out.append(ChatMessage(role, ("",)))
            continue
        if isinstance(message.content, str):
            out.append(ChatMessage(role, (checked_text(message.content, name),)))
            continue
        parts: list[str | ImageInput] = []
        for p_index, part in enumerate(message.content):
            if isinstance(part, TextPart):
                parts.append(checked_text(part.text, f"{name}.{p_index}.text"))
                continue
            where = f"{name}.{p_index}"
            if settings.mmproj is None:  # checked before any decoding: nothing to spend
                raise APIError(400, f"{where}: this model has no vision projector; it reads "
                               "text only (send the text alone, or serve a model with an "
                               "mmproj)", param=where, code="images_not_supported")
            if role not in ("user", "tool"):
                raise APIError(400, f"{where}: images are only accepted in user messages and "
                               "tool results", param=where)
            n_images += 1
            if n_images > settings.max_images_per_request:
                raise APIError(400, f"too many images (limit {settings.max_images_per_request})",
                               param=where)
            if isinstance(part, ImagePart):
                parts.append(await _decode(part.image_url.url, state, timer,
                                           f"{where}.image_url", part.image_url.detail,
                                           state.cache_tenant(client)))
            else:
                stored = await _uploaded(part, state.uploads, client, f"{where}.file.file_id")
                parts.append(await upload_at(stored, state, part.file.detail, timer))
        if role == "tool":
            out.append(ChatMessage("user", result_parts(tuple(parts))))
        else:
            out.append(ChatMessage(role, tuple(parts)))
    return out


def checked_text(text: str, param: str) -> str:
    """Text the tokenizer can take. JSON can carry lone surrogates ("\\ud800"), which are
    not Unicode text: refused here, where the answer can name the field."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise APIError(400, f"{param}: the text is not valid Unicode (a lone surrogate "
                           f"at character {exc.start})", param=param,
                           code="invalid_text") from None
    return text


async def _decode(url: str, state: AppState, timer: StageTimer, param: str,
                  detail: str | None, tenant: str) -> ImageInput:
    try:
        if state.settings.remote_images and url.lstrip()[:8].lower().startswith(
                ("http://", "https://")):
            data = await fetch_image_bytes(url.strip(), state.settings)
        else:
            data = await run_in_threadpool(partial(image_bytes_from_url, url,
                                                   limits=state.image_limits))
        image = await decode_cached(data, state, size_rule(state, detail), tenant)
    except ImageError as exc:
        raise image_api_error(exc, param) from None
    timer.images += 1
    timer.add("image_decode", image.decode_s)
    timer.add("image_resize", image.resize_s)
    return ImageInput(image.rgb, image.width, image.height, image.content_hash)


async def decode_cached(data: bytes, state: AppState, rule: SizeRule, tenant: str
                        ) -> DecodedImage:
    """The pixels `tenant` got for these bytes at `rule` before (a conversation sends its
    image again every turn; server/images/pixel_cache.py), else a decode, kept for next
    time. A reused image reports no decode or resize time here: none was spent."""
    digest = content_hash(data) if len(data) <= _HASH_ON_LOOP_BYTES \
        else await run_in_threadpool(content_hash, data)
    key = (tenant, digest, rule)
    cached = state.pixel_cache.get(key)
    if cached is not None:
        return replace(cached, decode_s=0.0, resize_s=0.0)
    image = await decode_within_budget(data, state, rule, digest)
    state.pixel_cache.put(key, image)
    return image


# blake2b hashes ~1 GB/s: 64 KiB is ~0.06 ms, less than a hop to a worker thread.
_HASH_ON_LOOP_BYTES = 64 * 1024


async def decode_within_budget(data: bytes, state: AppState, rule: SizeRule, digest: str = ""
                               ) -> DecodedImage:
    """Decode image bytes to `rule`'s size in a worker thread, chats and uploads alike: the
    header first, which says what the decode will cost (over the per-image limit:
    ImageTooLargeError), then the pixels, once that cost fits in the budget shared by all
    decodes in flight."""
    plan = await run_in_threadpool(partial(plan_decode, data, rule,
                                           limits=state.image_limits))
    return await state.decode_budget.run(plan.cost.total, partial(decode_planned, plan, digest))


def image_api_error(exc: ImageError, param: str) -> APIError:
    """413 for images over a size limit, 400 for everything else wrong with one."""
    status = 413 if isinstance(exc, ImageTooLargeError) else 400
    return APIError(status, f"{param}: {exc}", param=param, code="invalid_image")


async def _uploaded(part: FilePart, uploads: Uploads, client: str, param: str) -> StoredFile:
    kept = batch_image(part.file.file_id)  # a batch line: its batch keeps its images
    if kept is not None:
        return kept
    record = await uploads.get(part.file.file_id, client)
    if record is None:
        raise APIError(400, f"{param}: no uploaded file {part.file.file_id!r} (unknown, "
                       "deleted or expired)", param=param, code="file_not_found")
    return record
