"""Run the scenarios: text vs image one at a time, then image requests at rising concurrency."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

from server.bench.client import auth_headers, send_chat
from server.bench.payloads import BodyFactory, ImageSpec
from server.bench.progress import Progress
from server.bench.results import ScenarioResult, ServerInfo

API_SUFFIXES = ("/api/v1", "/v1")


class BenchError(RuntimeError):
    """The bench cannot run (server unreachable, not ready); the message says why."""


IMAGE_PROMPT = "Describe this image in one sentence."
TEXT_PROMPT = "Write one sentence about the sea."


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "text" or "image"
    concurrency: int
    requests: int


@dataclass(frozen=True)
class BenchPlan:
    url: str
    api_key: str | None = None
    requests: int = 10
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    image: ImageSpec = field(default_factory=ImageSpec)
    prompt: str | None = None  # None: IMAGE_PROMPT, or TEXT_PROMPT for a text-only model
    max_tokens: int = 64
    timeout_s: float = 300.0

    def scenarios(self, vision: bool = True) -> list[Scenario]:
        """Text and image one at a time, then image requests at each concurrency level; a
        text-only model (`vision` False) gets text requests at every level instead."""
        kind = "image" if vision else "text"
        base = [Scenario("text", "text", 1, self.requests)]
        if vision:
            base.append(Scenario("image", "image", 1, self.requests))
        # At least two rounds per worker, so each level sees the server full, not ramping.
        return base + [Scenario(f"c={c}", kind, c, max(self.requests, 2 * c))
                       for c in self.concurrency]


@dataclass
class BenchRun:
    plan: BenchPlan
    server: ServerInfo
    scenarios: list[ScenarioResult]
    image_bytes: int  # size of one request's JPEG
    started_at: float
    duration_s: float


def server_root(url: str) -> str:
    """`http://host:7860`, whether given with or without /api/v1 or /v1."""
    root = url.rstrip("/")
    for suffix in API_SUFFIXES:
        if root.endswith(suffix):
            return root[: -len(suffix)]
    return root


async def run_bench(plan: BenchPlan, progress: Progress) -> BenchRun:
    root = server_root(plan.url)
    scenarios = plan.scenarios()  # the most connections either way
    limits = httpx.Limits(max_connections=max((s.concurrency for s in scenarios), default=1) + 2)
    async with httpx.AsyncClient(headers=auth_headers(plan.api_key), limits=limits,
                                 timeout=httpx.Timeout(plan.timeout_s, connect=10.0)) as client:
        server = await _server_info(client, root)
        vision = server.meta.get("vision") is not False  # /models says "text only" so
        scenarios = plan.scenarios(vision)
        progress.total(sum(s.requests for s in scenarios))
        chat_url = f"{root}/api/v1/chat/completions"
        prompt = plan.prompt or (IMAGE_PROMPT if vision else TEXT_PROMPT)
        bodies = BodyFactory(server.model, prompt, plan.max_tokens, plan.image)
        started = time.time()
        progress.stage("warm-up")
        # One of each first, so connection set-up and first-call costs stay out of the stats.
        for kind in ("text", "image") if vision else ("text",):
            warm = await send_chat(client, chat_url, bodies.make(kind))
            if not warm.ok:
                raise BenchError(f"the warm-up {kind} request failed: {warm.error}")
        results = []
        for scenario in scenarios:
            progress.stage(f"{scenario.name} ({scenario.kind}, concurrency "
                           f"{scenario.concurrency})")
            prepared = [bodies.make(scenario.kind) for _ in range(scenario.requests)]
            results.append(await _run_scenario(client, chat_url, scenario, prepared, progress))
    return BenchRun(plan=plan, server=server, scenarios=results,
                    image_bytes=bodies.last_image_bytes, started_at=started,
                    duration_s=time.time() - started)


async def _server_info(client: httpx.AsyncClient, root: str) -> ServerInfo:
    try:
        health = await client.get(f"{root}/health")
        if health.status_code == 503:
            raise BenchError(f"{root} is not ready yet: {health.text.strip()[:200]}")
        models = await client.get(f"{root}/api/v1/models")
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach {root}: {type(exc).__name__}: {exc}") from None
    if models.status_code in (401, 403):
        raise BenchError(f"{root} refused the API key (HTTP {models.status_code}); pass "
                         "--api-key or set VLSERVE_API_KEY")
    if models.status_code != 200:
        raise BenchError(f"GET {root}/api/v1/models answered HTTP {models.status_code}")
    card = models.json()["data"][0]
    return ServerInfo(url=root, model=card["id"], meta=card.get("meta") or {})


async def _run_scenario(client: httpx.AsyncClient, url: str, scenario: Scenario,
                        bodies: list[bytes], progress: Progress) -> ScenarioResult:
    """`concurrency` workers take bodies off one list until it is empty (a closed loop)."""
    pending = iter(bodies)
    samples = []

    async def worker() -> None:
        for body in pending:
            samples.append(await send_chat(client, url, body))
            progress.advance()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(scenario.concurrency)))
    return ScenarioResult(name=scenario.name, kind=scenario.kind,
                          concurrency=scenario.concurrency,
                          wall_s=time.perf_counter() - started, samples=samples)
