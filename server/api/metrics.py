"""GET /metrics: the Prometheus text exposition."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

metrics_router = APIRouter()


@metrics_router.get("/metrics", response_class=PlainTextResponse, responses={
    200: {"description": "Prometheus text exposition format",
          "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    body = request.app.state.vlserve.metrics.render()
    return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})
