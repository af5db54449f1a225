"""GET /health (readiness), /livez (liveness), /get_load (for the router) and /models."""

from __future__ import annotations

from pathlib import PurePath

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api.auth import client_identity
from server.api.errors import error_response
from server.api.openapi import responses
from server.api.protocol import Health, Live, Load, ModelCard, ModelList, Slots
from server.api.state import AppState
from server.engine import EngineState

health_router = APIRouter()
models_router = APIRouter()


@health_router.get("/health", responses={
    200: {"model": Health, "description": "Loaded and warmed up: `{\"status\": \"ok\"}`"},
    503: {"model": Health, "description": "`loading` (or warming up), `draining` (shutting "
          "down), `failed` or `stopped` (with `error`)"}})
async def health(request: Request) -> JSONResponse:
    """200 once the model is loaded and warm; 503 before that, or if the engine failed."""
    engine = request.app.state.vlserve.engine
    if engine.state is EngineState.READY:
        return JSONResponse({"status": "ok"})
    body: dict[str, object] = {"status": "loading"}
    if engine.state in (EngineState.FAILED, EngineState.STOPPED):
        body = {"status": engine.state.value, "error": engine.error}
    return JSONResponse(body, status_code=503)


@health_router.get("/livez", responses={200: {"model": Live, "description": "The process "
                  "answers HTTP; `engine` says its state (loading, ready, draining...)"}})
async def livez(request: Request) -> JSONResponse:
    """200 while the process serves HTTP, loading and draining included: unlike /health it
    never gates on readiness, so an orchestrator restarts only a server that stopped
    answering (a hung engine exits the process through its watchdog)."""
    state: AppState = request.app.state.vlserve
    engine = "draining" if state.drain.draining else state.engine.state.value
    return JSONResponse({"status": "alive", "engine": engine})


@health_router.get("/get_load", responses={200: {"model": Load, "description": "Requests "
                   "running plus waiting: what vllm-router's power_of_two policy compares"}})
async def get_load(request: Request) -> JSONResponse:
    engine = request.app.state.vlserve.engine
    return JSONResponse({"load": engine.busy_slots + engine.queue_depth})


@models_router.get("/models", responses=responses(ModelList))
async def list_models(request: Request) -> JSONResponse:
    state: AppState = request.app.state.vlserve
    return JSONResponse({"object": "list", "data": [_card(state)]})


@models_router.get("/models/{model_id:path}", responses=responses(ModelCard, 404))
async def get_model(model_id: str, request: Request) -> JSONResponse:
    state: AppState = request.app.state.vlserve
    if model_id != state.settings.model_name:
        return error_response(404, f"model {model_id!r} not found", param="model",
                              code="model_not_found")
    return JSONResponse(_card(state))


@models_router.get("/slots", responses=responses(Slots))
async def list_slots(request: Request) -> JSONResponse:
    """What each slot is doing and how many requests wait: the engine's load at a glance.

    Each caller sees its own requests only: a slot busy with another key's request shows
    its state, but no request id and no token counts.
    """
    engine = request.app.state.vlserve.engine
    caller = client_identity(request.scope)
    return JSONResponse({"queue_depth": engine.queue_depth, "busy_slots": engine.busy_slots,
                         "preencode_backlog": engine.preencode_backlog,
                         "slots": [_own_view(slot, caller) for slot in engine.slot_states()]})


def _own_view(slot: dict[str, object], caller: str) -> dict[str, object]:
    owner = slot.pop("client", None)
    if owner is not None and owner != caller:
        slot.update(request_id=None, n_past=0, generated_tokens=0)
    return slot


# Engine facts kept out of /models: system_info names the CPU's features (an attacker's map
# of the host; operators read it in the startup log), and paths show the server's layout.
_HIDDEN_META = frozenset({"system_info", "model_path", "mmproj_path"})


def _card(state: AppState) -> dict[str, object]:
    engine = state.engine
    info = engine.info
    meta = {"state": engine.state.value,
            **{key: value for key, value in info.items() if key not in _HIDDEN_META}}
    for key, name in (("model_path", "model_file"), ("mmproj_path", "mmproj_file")):
        if key in info:  # a text-only model has no projector file: null
            meta[name] = PurePath(str(info[key])).name if info[key] else None
    return {"id": state.settings.model_name, "object": "model", "created": state.started_at,
            "owned_by": "vlserve", "meta": meta}
