"""The FastAPI application: routes under /api/v1 and /v1, engine started in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server import __version__
from server.api.api_calls import ApiCallObserver
from server.api.auth import APIKeyMiddleware, is_protected
from server.api.batches import router as batches_router
from server.api.chat import router as chat_router
from server.api.completions import router as completions_router
from server.api.conversations import router as conversations_router
from server.api.drain import DrainMiddleware
from server.api.errors import install_error_handlers
from server.api.files import router as files_router
from server.api.input_tokens import router as input_tokens_router
from server.api.key_limits import KeyConcurrency
from server.api.key_shares import share_among
from server.api.keyring import KeyRing, key_rotation
from server.api.limits import RequestLimits
from server.api.metrics import metrics_router
from server.api.observe import RequestObserver
from server.api.openapi import install_openapi
from server.api.paths import ExactPaths
from server.api.replica import REPLICA_HEADER, ReplicaHeader
from server.api.responses import router as responses_router
from server.api.responses_background import fail_interrupted
from server.api.responses_background import router as background_router
from server.api.state import AppState
from server.api.status import health_router, models_router
from server.api.stored_chat import router as stored_chat_router
from server.api.tokenize import router as tokenize_router
from server.batches.runner import BatchRunner
from server.config import Settings
from server.engine import Engine
from server.images.backend import image_backend
from server.metrics import Metrics
from server.playground import mount_playground
from server.store import Codec, StateBackend, open_backend
from server.store.backend import redacted
from server.store.memory import MemoryTable
from server.store.snapshot import Tables
from server.store.snapshot_writer import SnapshotWriter

API_PREFIXES = ("/api/v1", "/v1")

logger = logging.getLogger("vlserve")

_DESCRIPTION = ("OpenAI-compatible vision chat server. Every route under `/api/v1` also "
                "answers under `/v1`. Errors are OpenAI error JSON.")


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the app; the engine loads in its own thread once the app starts."""
    engine = engine or Engine(settings)
    metrics = Metrics(settings, engine)
    keyring = KeyRing.from_settings(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        logger.info("images decoded by %s, downsized to at most %d px", image_backend(),
                    settings.image_max_side)
        logger.info("metrics at /metrics (GPU gauges %s)", "on" if metrics.gpu else "off")
        logger.info("uploads and stored responses kept in %s", redacted(settings.state_url))
        snapshot = _snapshot(settings, backend)
        writer = None
        if snapshot is not None:
            writer = kept = SnapshotWriter(*snapshot, settings.state_snapshot_interval_s,
                                           metrics.observe_snapshot, _fail_interrupted)
            metrics.watch_snapshot(lambda: kept.held)
            await writer.open()  # read back now, or once the server holding it stops
        engine.start()
        await batches.start()  # resumes unfinished batches once the engine is ready
        if writer is not None:  # started from it (a failed start leaves it as it was)
            writer.start()  # a crash from here on restores the last periodic write
        # Cancels and deletes sent to other replicas for the background runs here.
        marks = asyncio.create_task(state.stop_marks.watch(state.background),
                                    name="background stop marks")
        try:
            async with key_rotation(keyring):
                yield
        finally:
            marks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await marks
            await state.background.stop()  # those the drain did not wait out end failed
            if writer is not None:  # after the runs: their ends are in it
                await writer.close()
            await batches.stop()
            engine.stop()
            await backend.close()

    app = FastAPI(title="vlserve", version=__version__, lifespan=lifespan,
                  description=_DESCRIPTION)
    backend = open_backend(settings.state_url, settings.state_timeout_s)
    state = AppState(settings=settings, engine=engine, metrics=metrics, backend=backend)
    app.state.vlserve = state
    keyring.on_change = lambda keys: share_among(state, keys)
    state.batches = batches = BatchRunner(app, state, state.batch_store)
    metrics.batch_statuses = batches.statuses
    install_error_handlers(app)
    # Added innermost first: exact paths (a control character is a 404), body limits, then
    # the request observer (log line, metrics: so 404s and 413s are logged too), inside drain
    # and auth; CORS wraps everything (so 401/503 answers carry its headers), then drain
    # (refuses new work at shutdown), then auth.
    app.add_middleware(ExactPaths)
    app.add_middleware(RequestLimits, max_body_bytes=settings.max_request_bytes,
                       max_json_depth=settings.max_json_depth)
    generation_paths = frozenset(f"{prefix}{path}" for prefix in API_PREFIXES
                                 for path in ("/chat/completions", "/completions", "/responses"))
    # Inside the observer: a request over its key's share is logged and counted (a 429).
    app.add_middleware(KeyConcurrency, limit=settings.max_requests_per_key,
                       paths=generation_paths)
    app.add_middleware(RequestObserver, metrics=metrics, model=settings.model_name,
                       paths=generation_paths, write_timeout=settings.write_timeout)
    app.add_middleware(ApiCallObserver, metrics=metrics, prefixes=API_PREFIXES,
                       generation_paths=generation_paths, routes=app.routes)
    app.add_middleware(APIKeyMiddleware, keys=keyring, metrics_open=settings.metrics_open,
                       on_reject=metrics.observe_auth_rejection)
    install_openapi(app, lambda path: is_protected(path, metrics_open=settings.metrics_open),
                    keys=bool(keyring.keys))
    app.add_middleware(DrainMiddleware, drain=state.drain)
    if settings.replica_id:  # outermost but CORS: every answer says who gave it, 401s too
        app.add_middleware(ReplicaHeader, replica_id=settings.replica_id)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                           # X-Session-ID: the router's affinity key (README "Scaling out").
                           allow_headers=["Authorization", "Content-Type", "X-Session-ID"],
                           expose_headers=["Server-Timing", "X-Request-ID", "Retry-After",
                                           REPLICA_HEADER])
    app.include_router(health_router)
    app.include_router(metrics_router)
    for prefix in API_PREFIXES:
        documented = prefix == API_PREFIXES[0]  # /v1 is the same API again, for SDK defaults
        for router in (chat_router, stored_chat_router, completions_router,
                       input_tokens_router, responses_router, background_router,
                       conversations_router, files_router, batches_router, models_router,
                       tokenize_router):
            app.include_router(router, prefix=prefix, include_in_schema=documented)
    # vLLM and llama-server serve these at the root: their clients call them there.
    app.include_router(tokenize_router, include_in_schema=False)
    if settings.playground:
        mount_playground(app)
    return app


# What a snapshot keeps: records, not pixels (uploads are kept decoded: re-upload them).
SNAPSHOT_TABLES = ("responses", "conversations", "chat_completions")


def _fail_interrupted(tables: Tables) -> int:
    """Background responses read from a snapshot whose runs ended with its process (in
    place: a start's staged table, before it is in use)."""
    changed = 0
    for entry in tables["responses"][0].entries():
        failed = fail_interrupted(entry.value)
        if failed is not None:
            entry.value, changed = failed, changed + 1
    return changed


def _snapshot(settings: Settings, backend: StateBackend
              ) -> tuple[Path, dict[str, tuple[MemoryTable[Any], Codec[Any]]]] | None:
    """Where the single-box store is kept across restarts, and which tables (None: it is
    not, or the store is shared and lives elsewhere)."""
    if settings.state_snapshot is None or backend.shared:
        return None
    return settings.state_snapshot, {name: backend.memory_tables[name]
                                     for name in SNAPSHOT_TABLES}
