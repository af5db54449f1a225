"""Batch JSONL files in the Files API: kept as bytes on disk (server/batches/store.py),
with their own limits (batch_max_bytes, batch_max_lines), listed beside image uploads."""

from __future__ import annotations

import asyncio
import time

from server.api.errors import APIError
from server.api.expiry import form_expiry
from server.api.multipart import UploadForm, too_large
from server.api.state import AppState
from server.batches import views
from server.batches.lines import check_upload
from server.batches.quota import QuotaExceeded
from server.batches.store import BatchFile


async def upload(form: UploadForm, state: AppState, owner: str) -> dict[str, object]:
    settings = state.settings
    if len(form.file_bytes) > settings.batch_max_bytes:
        raise too_large(settings.batch_max_bytes)
    # Splitting tens of MiB into lines takes a while: off the loop, which serves requests.
    refusal = await asyncio.to_thread(check_upload, form.file_bytes, settings.batch_max_lines)
    if refusal is not None:
        raise APIError(400, refusal, param="file", code="invalid_batch_file")
    ttl_s = form_expiry(form.fields) or settings.batch_file_ttl_s
    try:
        record = await asyncio.to_thread(
            state.batch_store.add_file, form.file_name or "batch.jsonl", "batch",
            form.file_bytes, owner, ttl_s=ttl_s, quota=state.batch_quota)
    except QuotaExceeded as refused:
        raise _refusal(refused) from None
    state.metrics.observe_upload()
    return file_object(record)


async def lookup(state: AppState, file_id: str, owner: str) -> BatchFile | None:
    return await asyncio.to_thread(state.batch_store.get_file, file_id, owner)


async def listing(state: AppState, owner: str) -> list[BatchFile]:
    return await asyncio.to_thread(state.batch_store.list_files, owner)


async def delete(state: AppState, file_id: str, owner: str) -> bool:
    """Gone for the owner at once, as OpenAI's; the bytes go now, or, for the input of a
    batch still running (or waiting to resume), once the sweep finds it ended: deleting
    them under it would fail it after a restart and lose its finished lines."""
    record = await lookup(state, file_id, owner)
    if record is None:
        return False
    store = state.batch_store
    # Hidden first: a batch created from here on cannot name it, so the check below sees
    # every batch that reads it (but one created in the instant between: it fails, unrun).
    await asyncio.to_thread(store.expire_file, file_id, time.time())
    if state.batches is None or file_id not in await views.inputs_in_use(state.batches):
        await asyncio.to_thread(store.delete_file, file_id)
    return True


def _refusal(refused: QuotaExceeded) -> APIError:
    if refused.too_large:  # nothing anyone deletes makes room: the bound is the operator's
        return APIError(413, f"{refused}; split the batch into smaller files", param="file",
                        code="batch_quota_exceeded")
    if refused.whole_store:  # other keys' files: they go as they expire or are deleted
        return APIError(507, f"{refused}; try again once files expire or are deleted",
                        code="batch_store_full", headers={"Retry-After": "3600"})
    return APIError(413, f"{refused}: delete batch files you no longer need "
                    "(DELETE /v1/files/{file_id})", param="file", code="batch_quota_exceeded")


def file_object(record: BatchFile) -> dict[str, object]:
    return {"id": record.id, "object": "file", "bytes": record.bytes,
            "created_at": record.created_at, "filename": record.filename,
            "purpose": record.purpose, "status": "processed", "expires_at": record.expires_at}
