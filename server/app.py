"""The FastAPI application: routes under /api/v1 and /v1, engine started in the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import __version__
from server.api.chat import router as chat_router
from server.api.errors import install_error_handlers
from server.api.files import router as files_router
from server.api.state import AppState
from server.api.status import health_router, models_router
from server.config import Settings
from server.engine import Engine
from server.uploads import UploadStore

API_PREFIXES = ("/api/v1", "/v1")


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the app; the engine loads in its own thread once the app starts."""
    engine = engine or Engine(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="vlserve", version=__version__, lifespan=lifespan)
    uploads = UploadStore(settings.upload_max_files, settings.upload_store_mb * 1024 * 1024,
                          settings.upload_ttl_s)
    app.state.vlserve = AppState(settings=settings, engine=engine, uploads=uploads)
    install_error_handlers(app)
    app.include_router(health_router)
    for prefix in API_PREFIXES:
        app.include_router(chat_router, prefix=prefix)
        app.include_router(files_router, prefix=prefix)
        app.include_router(models_router, prefix=prefix)
    return app
