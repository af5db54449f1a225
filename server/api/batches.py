"""OpenAI Batch API: create, retrieve, list, cancel. The work itself is server/batches/."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from server.api.auth import client_identity
from server.api.batch_protocol import BatchCreateRequest, BatchList, BatchObject
from server.api.errors import APIError
from server.api.item_pages import list_page
from server.api.openapi import responses
from server.api.state import AppState
from server.batches import views
from server.batches.job import MAX_WINDOW_S, new_batch, public, window_seconds
from server.batches.lines import ENDPOINTS
from server.batches.runner import BatchRunner

router = APIRouter()


@router.post("/batches", responses=responses(BatchObject, 400, 429, 507))
async def create_batch(body: BatchCreateRequest, request: Request) -> JSONResponse:
    state: AppState = request.app.state.vlserve
    owner = client_identity(request.scope)
    if body.endpoint not in ENDPOINTS:
        raise APIError(400, f"endpoint {body.endpoint!r} is not supported; use one of "
                       f"{', '.join(ENDPOINTS)}", param="endpoint", code="invalid_endpoint")
    if window_seconds(body.completion_window) is None:
        raise APIError(400, "completion_window must be a whole number of s, m, h or d "
                       f"such as \"24h\", at most {MAX_WINDOW_S // 86400} days ("
                       f"{body.completion_window!r} is not)", param="completion_window",
                       code="invalid_completion_window")
    for key, value in (body.metadata or {}).items():
        if len(key) > 64 or len(value) > 512:
            raise APIError(400, "metadata keys are at most 64 characters, values at most "
                           "512", param="metadata")
    file = await asyncio.to_thread(state.batch_store.get_file, body.input_file_id, owner)
    if file is None or file.purpose != "batch":
        raise APIError(400, f"input_file_id: no batch file {body.input_file_id!r} (upload it "
                       "with purpose \"batch\")", param="input_file_id",
                       code="invalid_input_file")
    batch = new_batch(owner, file.id, body.endpoint, body.completion_window, body.metadata)
    if body.output_expires_after is not None:
        batch["_output_expires_s"] = body.output_expires_after.seconds
    runner, limit = _runner(state), state.settings.batch_max_open_per_key
    async with runner.creating:
        if await views.open_count(runner, owner) >= limit:
            raise APIError(429, f"this key has {limit} batches that have not ended, the most "
                           "it may have; create this one once one of them ends (or cancel "
                           "one)", code="too_many_open_batches")
        return JSONResponse(await runner.add(batch))


@router.get("/batches", responses=responses(BatchList, 400))
async def list_batches(request: Request, after: str | None = None,
                       limit: int = Query(20, ge=1, le=100)) -> JSONResponse:
    """Newest first, cursor-paginated like OpenAI's (`after`, `limit`, `has_more`)."""
    state: AppState = request.app.state.vlserve
    batches = await views.owned(_runner(state), client_identity(request.scope))
    if after is not None:
        ids = [b["id"] for b in batches]
        if after not in ids:
            raise APIError(400, f"after: no batch with id {after!r}", param="after",
                           code="invalid_cursor")
        batches = batches[ids.index(after) + 1:]
    return JSONResponse(list_page([public(b) for b in batches[:limit]],
                                  has_more=len(batches) > limit))


@router.get("/batches/{batch_id}", responses=responses(BatchObject, 404))
async def get_batch(batch_id: str, request: Request) -> JSONResponse:
    state: AppState = request.app.state.vlserve
    return JSONResponse(public(await _lookup(state, batch_id, request)))


@router.post("/batches/{batch_id}/cancel", responses=responses(BatchObject, 404, 409))
async def cancel_batch(batch_id: str, request: Request) -> JSONResponse:
    """Lines in the engine are stopped; finished ones stay in the output file."""
    state: AppState = request.app.state.vlserve
    batch = await _lookup(state, batch_id, request)
    if batch["status"] not in ("validating", "in_progress", "cancelling"):
        raise APIError(409, f"a batch that is {batch['status']} cannot be cancelled",
                       param="batch_id", code="batch_not_cancellable")
    await _runner(state).cancel(batch)
    return JSONResponse(public(batch))


def _runner(state: AppState) -> BatchRunner:
    assert state.batches is not None, "the app starts the batch runner"
    return state.batches


async def _lookup(state: AppState, batch_id: str, request: Request) -> dict[str, Any]:
    batch = await views.find(_runner(state), batch_id, client_identity(request.scope))
    if batch is None:
        raise APIError(404, f"no batch with id {batch_id!r}", param="batch_id",
                       code="batch_not_found")
    return batch
