"""/health follows the engine's state machine: loading → ok, or → failed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from server.app import create_app
from server.config import load_settings
from server.demo_model import DemoModelPaths
from server.engine import Engine, EngineState


def _get(app: object, path: str, **kwargs: object) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)  # no lifespan: the engine is not started
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            if kwargs:
                return await client.post(path, **kwargs)
            return await client.get(path)
    return asyncio.run(go())


def test_loading_engine_answers_503_everywhere(demo_model: DemoModelPaths) -> None:
    settings = load_settings(None, model=demo_model.text, mmproj=demo_model.mmproj)
    engine = Engine(settings)
    app = create_app(settings, engine)
    assert engine.state is EngineState.LOADING
    health = _get(app, "/health")
    assert health.status_code == 503 and health.json() == {"status": "loading"}
    chat = _get(app, "/api/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 503
    assert chat.json()["error"]["code"] == "model_not_ready"
    assert chat.headers["retry-after"]


def test_engine_becomes_ready_after_warmup(demo_model: DemoModelPaths) -> None:
    settings = load_settings(None, model=demo_model.text, mmproj=demo_model.mmproj)
    engine = Engine(settings)
    app = create_app(settings, engine)
    seen = set()
    engine.start()
    try:
        deadline = time.monotonic() + 60
        while engine.state in (EngineState.LOADING, EngineState.WARMING):
            status = _get(app, "/health").status_code
            if engine.state in (EngineState.LOADING, EngineState.WARMING):
                seen.add(status)  # still not ready after the answer: it must have been a 503
            assert time.monotonic() < deadline
        assert engine.state is EngineState.READY, engine.error
        assert engine.warmup_seconds is not None and engine.warmup_seconds > 0
        assert _get(app, "/health").status_code == 200
        assert seen <= {503}
    finally:
        engine.stop()


def test_engine_that_cannot_load_reports_failed(tmp_path: Path,
                                                demo_model: DemoModelPaths) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    settings = load_settings(None, model=broken, mmproj=demo_model.mmproj)
    engine = Engine(settings)
    app = create_app(settings, engine)
    engine.start()
    engine.stop(timeout=30)
    assert engine.state is EngineState.FAILED
    body = _get(app, "/health").json()
    assert body["status"] == "failed" and "could not load" in body["error"]
