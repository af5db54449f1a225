"""OpenAI Files API: images (upload returns once validated), batch JSONL files (on disk,
server/api/batch_files.py), list, get, content, delete.

After answering, the image is queued for vision encoding at low priority, so a chat that
references it (`{"type": "file", "file": {"file_id": ...}}`) skips the encoder.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import BinaryIO, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.api import batch_files
from server.api.auth import client_identity
from server.api.errors import APIError
from server.api.expiry import MAX_S, MIN_S, form_expiry
from server.api.image_detail import size_rule, upload_at, upload_cache_id
from server.api.item_pages import list_page
from server.api.messages import decode_within_budget, image_api_error
from server.api.multipart import read_upload_form, too_large
from server.api.openapi import responses
from server.api.protocol import FileDeleted, FileList, FileObject
from server.api.state import AppState
from server.batches.store import BatchFile
from server.engine import ImageInput
from server.images import ImageError
from server.uploads import StoredFile, UploadRefused

router = APIRouter()
_CHUNK = 256 * 1024  # bytes of a file's content read and sent at a time

# What an upload may be for, by what this server can do with it: an image a chat names by
# file_id ("vision"; "user_data" is OpenAI's purpose for a chat's file inputs), or a batch
# input. Output files ("batch_output") are only ever written by batches.
IMAGE_PURPOSES = frozenset({"vision", "user_data"})
PURPOSES = IMAGE_PURPOSES | {"batch"}


# The form is read by server.api.multipart (bounded, in memory), so it is declared by hand.
_UPLOAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "a JPEG, PNG, WebP, GIF or BMP image"},
                   "purpose": {"type": "string", "default": "vision",
                               "enum": sorted(PURPOSES)},
                   "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                   "expires_after[seconds]": {
                       "type": "integer", "minimum": MIN_S, "maximum": MAX_S,
                       "description": "batch files only (default: batch_file_ttl_s)"}}}}}}}


@router.post("/files", responses=responses(FileObject, 400, 413, 507), openapi_extra=_UPLOAD_FORM)
async def upload_file(request: Request) -> JSONResponse:
    state: AppState = request.app.state.vlserve
    settings = state.settings
    # The purpose is a field of the same form: read up to the larger of the two limits,
    # then hold each kind of file to its own.
    form = await read_upload_form(request, max(settings.upload_max_bytes,
                                               settings.batch_max_bytes))
    if form.file_field is None:
        raise APIError(400, "the form has no file part", param="file", code="invalid_upload")
    purpose = form.fields.get("purpose", "vision")
    if purpose not in PURPOSES:  # stored as asked, it would only mislead a purpose filter
        raise APIError(400, f"purpose {purpose!r} is not served here; use one of "
                       f"{', '.join(sorted(PURPOSES))} (images: vision or user_data; "
                       "batch input files: batch)", param="purpose", code="invalid_purpose")
    if purpose == "batch":
        return JSONResponse(await batch_files.upload(form, state, client_identity(request.scope)))
    if settings.mmproj is None:  # nothing could use it: refused before decoding
        raise APIError(400, "this model has no vision projector; it reads text only, so an "
                       "uploaded image could not be used in its chats (purpose \"batch\" "
                       "files are taken)", param="file", code="images_not_supported")
    if form_expiry(form.fields) is not None:
        raise APIError(400, f"image uploads are kept {settings.upload_ttl_s:g} s at most (the "
                       "server's upload_ttl_s; each file object's expires_at says when it "
                       "goes); expires_after applies to batch files", param="expires_after",
                       code="unsupported_parameter")
    if len(form.file_bytes) > settings.upload_max_bytes:
        raise too_large(settings.upload_max_bytes)
    try:
        # Kept at the `high` size; chats asking for less get it resized (image_detail).
        decoded = await decode_within_budget(form.file_bytes, state, size_rule(state, "high"))
    except ImageError as exc:
        raise image_api_error(exc, "file") from None
    image = ImageInput(decoded.rgb, decoded.width, decoded.height, decoded.content_hash)
    try:
        record = await state.uploads.add(form.file_name or "upload", purpose, len(form.file_bytes),
                                   image, owner=client_identity(request.scope),
                                   source_size=decoded.oriented_source_size)
    except UploadRefused as exc:
        raise APIError(exc.status, str(exc), param="file", code=exc.code) from None
    state.metrics.observe_upload()
    if state.engine.ready:  # pre-encoded at the size a chat without `detail` uses
        state.engine.preencode(await upload_at(record, state, "auto"),
                               state.cache_tenant(record.owner))
    return JSONResponse(_file_object(record, state))


@router.get("/files", responses=responses(FileList, 400))
async def list_files(request: Request, after: str | None = None,
                     limit: int = Query(10_000, ge=1, le=10_000),
                     order: Literal["asc", "desc"] = "desc",
                     purpose: str | None = Query(None, max_length=64)) -> JSONResponse:
    """Cursor-paginated like OpenAI's (`after`, `limit`, `has_more`), which the SDK follows;
    `purpose` keeps only the files of that purpose (`batch`: inputs, not outputs).

    Pages follow a total order (creation time to the microsecond, then id) that reading
    never changes; an `after` that names none of the caller's files is a 400, not an empty
    page that would end the listing silently.
    """
    state: AppState = request.app.state.vlserve
    client = client_identity(request.scope)
    listed: list[StoredFile | BatchFile] = [*await state.uploads.list(client),
                                            *await batch_files.listing(state, client)]
    if purpose is not None:  # a cleanup of one purpose must not see (and delete) the others
        listed = [f for f in listed if f.purpose == purpose]
    files = sorted(listed, key=lambda f: f.order_key)
    if order == "desc":
        files.reverse()
    if after is not None:
        ids = [f.id for f in files]
        if after not in ids:
            raise APIError(400, f"after: no file with id {after!r} (unknown, deleted or "
                           "expired); list again from the start", param="after",
                           code="invalid_cursor")
        files = files[ids.index(after) + 1:]
    return JSONResponse(list_page([_any_file_object(f, state) for f in files[:limit]],
                                  has_more=len(files) > limit))


@router.get("/files/{file_id}", responses=responses(FileObject, 404))
async def get_file(file_id: str, request: Request) -> JSONResponse:
    state: AppState = request.app.state.vlserve
    return JSONResponse(_any_file_object(await _lookup(request, file_id), state))


@router.get("/files/{file_id}/content", response_class=Response,
            responses={200: {"content": {"application/jsonl": {}},
                             "description": "the file's bytes (batch files only)"},
                       **responses(None, 400, 404)})
async def file_content(file_id: str, request: Request) -> Response:
    """A batch input, output or error file, byte for byte. Images are kept decoded only,
    so their upload's bytes are not there to return."""
    state: AppState = request.app.state.vlserve
    record = await _lookup(request, file_id)
    if isinstance(record, StoredFile):
        raise APIError(400, "image uploads are kept decoded; their original bytes are not "
                       "stored", param="file_id", code="content_not_available")
    try:
        stream, size = await asyncio.to_thread(_open, state, record.id)
    except FileNotFoundError:  # deleted since the lookup
        raise _not_found(file_id) from None
    return StreamingResponse(_chunks(stream), media_type="application/jsonl",
                             headers={"Content-Length": str(size)})


def _open(state: AppState, file_id: str) -> tuple[BinaryIO, int]:
    stream = state.batch_store.open_file(file_id)
    size = stream.seek(0, os.SEEK_END)
    stream.seek(0)
    return stream, size


async def _chunks(stream: BinaryIO) -> AsyncIterator[bytes]:
    """Read off the loop, a chunk at a time: an output file can be far larger than any
    input (batch_max_bytes bounds inputs only), and several may be downloaded at once."""
    try:
        while chunk := await asyncio.to_thread(stream.read, _CHUNK):
            yield chunk
    finally:
        stream.close()


@router.delete("/files/{file_id}", responses=responses(FileDeleted, 404))
async def delete_file(file_id: str, request: Request) -> JSONResponse:
    state: AppState = request.app.state.vlserve
    client = client_identity(request.scope)
    if not await state.uploads.delete(file_id, client) and \
            not await batch_files.delete(state, file_id, client):
        raise _not_found(file_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


async def _lookup(request: Request, file_id: str) -> StoredFile | BatchFile:
    state: AppState = request.app.state.vlserve
    client = client_identity(request.scope)
    record = await state.uploads.get(file_id, client) or await batch_files.lookup(
        state, file_id, client)
    if record is None:
        raise _not_found(file_id)
    return record


def _any_file_object(record: StoredFile | BatchFile, state: AppState) -> dict[str, object]:
    if isinstance(record, BatchFile):
        return batch_files.file_object(record)
    return _file_object(record, state)


def _not_found(file_id: str) -> APIError:
    return APIError(404, f"no file with id {file_id!r} (unknown, deleted or expired)",
                    param="file_id", code="file_not_found")


def _file_object(record: StoredFile, state: AppState) -> dict[str, object]:
    encoded = state.engine.is_encoded(upload_cache_id(record, state, "auto"),
                                      state.cache_tenant(record.owner))
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "filename": record.filename,
        "purpose": record.purpose,
        # OpenAI's statuses: "uploaded" until the vision encoder has run, then "processed".
        "status": "processed" if encoded else "uploaded",
        "width": record.image.width,
        "height": record.image.height,
        # At the latest: a key over its quota evicts its least recently used files first.
        "expires_at": record.created_at + int(state.settings.upload_ttl_s),
    }
