"""One streamed chat request, timed from the client's side."""

from __future__ import annotations

import json
import time

import httpx

from server.bench.results import Sample


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def send_chat(client: httpx.AsyncClient, url: str, body: bytes) -> Sample:
    """POST a streaming chat request; the final chunks carry the server's `timings`."""
    started = time.perf_counter()
    first: float | None = None
    timings: dict[str, float] = {}
    error: str | None = None
    try:
        async with client.stream("POST", url, content=body,
                                 headers={"Content-Type": "application/json"}) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", errors="replace")
                return Sample(ok=False, status=response.status_code, error=_error_text(text),
                              client_total_ms=_ms_since(started))
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if first is None:
                    first = _ms_since(started)
                data = line[6:]
                if data == "[DONE]":
                    break
                # Token chunks are most of the stream: parse only the ones that matter.
                if '"timings"' in data or '"error"' in data:
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = _error_text(json.dumps(chunk))
                    timings = chunk.get("timings") or timings
            status = response.status_code
    except httpx.HTTPError as exc:
        return Sample(ok=False, status=0, error=f"{type(exc).__name__}: {exc}",
                      client_total_ms=_ms_since(started))
    if error is None and not timings:
        error = "the stream ended without timings"
    return Sample(ok=error is None, status=status, client_total_ms=_ms_since(started),
                  client_ttft_ms=first, error=error, timings=timings if error is None else {})


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _error_text(body: str) -> str:
    """The OpenAI error message if the body is one, else the start of the body."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.strip()[:200] or "empty response"
    return str(message)[:200]
