"""The `vlserve batch` command: its options, and the two places a batch can run."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from server.batches.offline import Progress, run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="JSONL request lines (OpenAI's batch format)")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="where the answers go; failures go to OUTPUT.errors.jsonl")
    parser.add_argument("--url", help="feed a running server (e.g. http://127.0.0.1:7860) "
                        "instead of loading the model here")
    parser.add_argument("--api-key", default=os.environ.get("VLSERVE_API_KEY"),
                        help="with --url: the server's API key (default $VLSERVE_API_KEY)")
    parser.add_argument("--completion-window", default="24h")
    # The model options of `serve` (used without --url).
    parser.add_argument("--config", type=Path, help="YAML preset (default configs/default.yaml)")
    parser.add_argument("--model", type=Path, help="text model GGUF")
    parser.add_argument("--mmproj", type=Path, help="vision projector (mmproj) GGUF")
    parser.add_argument("--model-name")
    parser.add_argument("--chat-template")
    parser.add_argument("--n-ctx", type=int)
    parser.add_argument("--n-gpu-layers", type=int)
    parser.add_argument("--n-parallel", type=int)
    parser.add_argument("--log-level", default="warning",
                        help="server log level in this process (default warning)")


def run_command(args: argparse.Namespace) -> int:
    if not args.input.is_file():
        print(f"vlserve batch: no such file: {args.input}", file=sys.stderr)
        return 2
    if args.url:
        return asyncio.run(run(RemoteBackend(args.url, args.api_key), args.input, args.output,
                               args.completion_window))
    return _run_local(args)


class RemoteBackend:
    """A running server's Batch API over HTTP."""

    def __init__(self, url: str, api_key: str | None) -> None:
        base = url.rstrip("/")
        self.base = base if base.endswith(("/v1", "/api/v1")) else f"{base}/api/v1"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async with httpx.AsyncClient(timeout=120, headers=self.headers) as client:
            answer = await client.request(method, f"{self.base}{path}", **kwargs)
        if answer.status_code != 200:
            raise SystemExit(f"vlserve batch: {method} {path}: HTTP {answer.status_code}: "
                             f"{answer.text[:500]}")
        return answer

    async def submit(self, data: bytes, window: str) -> str:
        file = await self._call("POST", "/files", data={"purpose": "batch"},
                                files={"file": ("input.jsonl", data)})
        batch = await self._call("POST", "/batches", json={
            "input_file_id": file.json()["id"], "endpoint": "/v1/chat/completions",
            "completion_window": window})
        return str(batch.json()["id"])

    async def batch(self, batch_id: str) -> dict[str, Any]:
        return dict((await self._call("GET", f"/batches/{batch_id}")).json())

    async def content(self, file_id: str) -> bytes:
        return (await self._call("GET", f"/files/{file_id}/content")).content


class LocalBackend:
    """The app in this process, with no HTTP server: the same runner as `serve` uses."""

    def __init__(self, app: Any) -> None:
        self.state = app.state.vlserve

    async def submit(self, data: bytes, window: str) -> str:
        from server.batches.job import MAX_WINDOW_S, new_batch, window_seconds
        from server.batches.lines import check_upload

        if window_seconds(window) is None:  # as the API's 400, not new_batch's assert
            raise SystemExit(f"vlserve batch: --completion-window {window!r}: a whole number "
                             f"of s, m, h or d, at most {MAX_WINDOW_S // 86400} days")
        refusal = check_upload(data, self.state.settings.batch_max_lines)
        if refusal is not None:
            raise SystemExit(f"vlserve batch: {refusal}")
        file = await asyncio.to_thread(self.state.batch_store.add_file, "input.jsonl",
                                       "batch", data)
        batch = new_batch("", file.id, "/v1/chat/completions", window, None)
        return str((await self.state.batches.add(batch))["id"])

    async def batch(self, batch_id: str) -> dict[str, Any]:
        return dict(self.state.batches.get(batch_id, ""))

    async def content(self, file_id: str) -> bytes:
        return bytes(await asyncio.to_thread(self.state.batch_store.file_bytes, file_id))


def _run_local(args: argparse.Namespace) -> int:
    from server.cli import ensure_servable
    from server.config import load_settings
    from server.logs import setup_logging

    with tempfile.TemporaryDirectory(prefix="vlserve-batch-") as state_dir:
        # Its own state directory, and never a shared store: a server's batches are not
        # this run's business (on Redis it would claim the cluster's batches).
        settings = load_settings(
            args.config, model=args.model, mmproj=args.mmproj, model_name=args.model_name,
            chat_template=args.chat_template, n_ctx=args.n_ctx,
            n_gpu_layers=args.n_gpu_layers, n_parallel=args.n_parallel,
            log_level=args.log_level, batch_dir=Path(state_dir), playground=False,
            state_url="memory://")
        setup_logging(settings.log_level)
        ensure_servable(settings)
        return asyncio.run(_serve_batch(settings, args))


async def _serve_batch(settings: Any, args: argparse.Namespace) -> int:
    from server.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        state = app.state.vlserve
        while not state.engine.ready:  # loading and warm-up
            if state.engine.state.value == "failed":
                print("vlserve batch: the model failed to load (see the log above)",
                      file=sys.stderr)
                return 1
            await asyncio.sleep(0.05)
        return await run(LocalBackend(app), args.input, args.output, args.completion_window,
                         Progress())
