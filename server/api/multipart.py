"""Bounded streaming multipart/form-data reader: one file part plus small text fields,
kept in memory (never spooled to disk), rejected as soon as it grows past its limit."""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import Request

from server.api.errors import APIError

MAX_FIELD_BYTES = 4096
MAX_FIELDS = 16
FILE_FIELD = "file"


@dataclass
class UploadForm:
    fields: dict[str, str] = field(default_factory=dict)
    file_name: str | None = None
    file_field: str | None = None
    file_bytes: bytes = b""


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)


async def read_upload_form(request: Request, max_file_bytes: int) -> UploadForm:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise APIError(400, "expected a multipart/form-data body with a file part",
                       code="invalid_upload")
    declared = request.headers.get("content-length")
    limit = max_file_bytes + 64 * 1024  # room for part headers and small fields
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(max_file_bytes)

    form = UploadForm()
    parts: list[_Part] = []
    current = _Part()

    def on_part_begin() -> None:
        nonlocal current
        current = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        current.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        current.header_value += data[start:end]

    def on_header_end() -> None:
        current.headers[bytes(current.header_field).lower()] = bytes(current.header_value)
        current.header_field.clear()
        current.header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current.data += data[start:end]
        if len(current.data) > max_file_bytes:
            raise too_large(max_file_bytes)

    def on_part_end() -> None:
        parts.append(current)
        if len(parts) > MAX_FIELDS:
            raise APIError(400, "too many form fields", code="invalid_upload")

    callbacks = {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_part_data": on_part_data, "on_part_end": on_part_end,
    }
    received = 0
    try:
        # Inside the try: the parser refuses some boundaries (over 256 characters) as it is
        # built, and that is the client's malformed body, not a server error.
        parser = MultipartParser(boundary, callbacks)
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise too_large(max_file_bytes)
            parser.write(chunk)
        parser.finalize()
    except (APIError, HTTPException):  # over a limit: answered as such, not as malformed
        raise
    except Exception:
        raise APIError(400, "malformed multipart body", code="invalid_upload") from None

    for part in parts:
        _, disposition = parse_options_header(part.headers.get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", errors="replace")
        # The image is the part with a filename, or the part named "file" (curl -F 'file=<x').
        if b"filename" in disposition or name == FILE_FIELD:
            if form.file_field is not None:
                raise APIError(400, "send exactly one file per upload", code="invalid_upload")
            form.file_field = name
            form.file_name = disposition.get(b"filename", b"").decode("utf-8",
                                                                     errors="replace")[:255]
            form.file_bytes = bytes(part.data)
        elif len(part.data) <= MAX_FIELD_BYTES:
            form.fields[name] = bytes(part.data).decode("utf-8", errors="replace")
        else:
            raise APIError(400, f"form field {name!r} is too long", param=name,
                           code="invalid_upload")
    return form


def too_large(max_file_bytes: int) -> APIError:
    return APIError(413, f"upload larger than {max_file_bytes} bytes", code="file_too_large")
