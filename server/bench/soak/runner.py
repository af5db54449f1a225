"""The soak run: N clients for a bounded time, the server process watched from /proc.

Order: health check; open fds and the server's chat-request count before; the load (the
first `warmup_s` fill caches and pools, RSS sampled every half second throughout); then,
with every client gone, wait for idle slots, count fds and chat requests again, and send
one last chat that must still succeed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from server.bench.soak import probe
from server.bench.soak.client import ClientPlan, Outcome, SoakClient
from server.bench.soak.workload import bad_requests, chat_body, image_pool

API = "/api/v1"
SAMPLE_EVERY_S = 0.5


class SoakError(RuntimeError):
    """The soak could not run (server unreachable or not ready)."""


@dataclass(frozen=True)
class SoakPlan:
    url: str  # server base URL, with or without /api/v1
    api_key: str | None = None
    clients: int = 64
    duration_s: float = 300.0
    warmup_s: float | None = None  # None: 20 % of the duration, 2 to 60 s
    max_tokens: int = 32
    timeout_s: float = 120.0  # per request
    images: int = 24  # distinct pictures, reused
    seed: int = 0
    pid: int | None = None  # the server process; None: found by its listening port

    @property
    def warmup(self) -> float:
        if self.warmup_s is not None:
            return min(self.warmup_s, self.duration_s / 2)
        return min(60.0, max(2.0, self.duration_s * 0.2), self.duration_s / 2)


@dataclass
class SoakRun:
    """What was measured; judged by server.bench.soak.report."""

    plan: SoakPlan
    pid: int | None
    outcomes: list[Outcome]
    rss: list[tuple[float, int]]  # (seconds since the load started, bytes)
    load_s: float  # from the first request to the last answer
    fds_before: int | None = None
    fds_after: int | None = None
    server_chats: int | None = None  # chat requests the server counted during the run
    idle_after: bool = False  # no busy slot, nothing queued, once the clients were gone
    final_status: int = 0  # the chat sent after the run
    notes: list[str] = field(default_factory=list)
    # Bytes the server's bounded caches hold (vlserve_prompt_cache_ram_bytes) at each RSS
    # sample: growth into a configured bound is not a leak.
    cached: list[int] = field(default_factory=list)


async def run_soak(plan: SoakPlan, report: Callable[[str], None] = print) -> SoakRun:
    base = plan.url.rstrip("/").removesuffix(API)
    auth = {"Authorization": f"Bearer {plan.api_key}"} if plan.api_key else {}
    async with httpx.AsyncClient(base_url=base, headers=auth, timeout=30) as admin:
        try:
            health = await admin.get("/health")
        except httpx.HTTPError as exc:
            raise SoakError(f"cannot reach {base}: {exc}") from None
        if health.status_code != 200:
            raise SoakError(f"{base}/health answered {health.status_code}: not ready")
        pid = plan.pid or _local_pid(base)
        run = SoakRun(plan, pid, [], [], 0.0)
        if pid is None:
            run.notes.append("server process not found (not local?): no RSS or fd figures")
        run.fds_before = _fds(pid)
        chats_before = await _server_chats(admin)

        started = time.monotonic()
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_rss(pid, started, run, stop, admin))
        ticker = asyncio.create_task(_progress(run, started, stop, report))
        await _load(plan, run.outcomes, auth, started + plan.duration_s)
        run.load_s = time.monotonic() - started
        stop.set()
        await asyncio.gather(sampler, ticker)

        run.idle_after = await _wait_idle(admin)
        run.fds_after = await _settled_fds(pid, run.fds_before)
        chats_after = await _server_chats(admin)
        if chats_before is not None and chats_after is not None:
            run.server_chats = chats_after - chats_before
        final = await admin.post(f"{API}/chat/completions", timeout=plan.timeout_s,
                                 content=chat_body("Still there?", 4),
                                 headers={"content-type": "application/json"})
        run.final_status = final.status_code
    return run


async def _load(plan: SoakPlan, outcomes: list[Outcome], auth: dict[str, str],
                deadline: float) -> None:
    images = image_pool(plan.images, plan.seed)
    bad = bad_requests(with_key=bool(plan.api_key))
    base = plan.url.rstrip("/").removesuffix(API) + API
    # One connection per client, as separate apps would have.
    clients = [httpx.AsyncClient(base_url=base, headers=auth, timeout=plan.timeout_s,
                                 limits=httpx.Limits(max_connections=1))
               for _ in range(plan.clients)]
    try:
        await asyncio.gather(*(
            SoakClient(http, ClientPlan(i, deadline, plan.max_tokens, images, bad, auth,
                                        plan.seed * 100_003 + i), outcomes).run()
            for i, http in enumerate(clients)))
    finally:
        await asyncio.gather(*(http.aclose() for http in clients))


async def _sample_rss(pid: int | None, started: float, run: SoakRun, stop: asyncio.Event,
                      admin: httpx.AsyncClient) -> None:
    async def sample() -> None:
        rss = probe.rss_bytes(pid)  # type: ignore[arg-type]
        run.rss.append((time.monotonic() - started, rss))
        run.cached.append(await _bounded_cache_bytes(admin))

    while pid is not None:
        try:
            await sample()
        except OSError:
            return  # the server is gone: the outcomes will say so
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)
            await sample()
            return
        except TimeoutError:
            continue


# Caches the server bounds itself, in host RAM: filling one is not a leak.
_BOUNDED_CACHES = ("vlserve_prompt_cache_ram_bytes ", "vlserve_image_pixel_cache_bytes ")


async def _bounded_cache_bytes(admin: httpx.AsyncClient) -> int:
    """What the server's bounded caches hold (/metrics), or 0 when it does not say."""
    try:
        answer = await admin.get("/metrics")
    except httpx.HTTPError:
        return 0
    return sum(int(float(line.rsplit(" ", 1)[1]))
               for line in (answer.text.splitlines() if answer.status_code == 200 else ())
               if line.startswith(_BOUNDED_CACHES))


async def _progress(run: SoakRun, started: float, stop: asyncio.Event,
                    report: Callable[[str], None], every_s: float = 10.0) -> None:
    while True:
        try:
            await asyncio.wait_for(stop.wait(), every_s)
            return
        except TimeoutError:
            pass
        counts = {v: 0 for v in ("ok", "429", "bad_4xx", "abandoned", "other")}
        for outcome in list(run.outcomes):
            counts[outcome.verdict] += 1
        rss = f", server RSS {run.rss[-1][1] / 2**20:.1f} MiB" if run.rss else ""
        report(f"  {time.monotonic() - started:5.0f} s: {len(run.outcomes)} answers "
               + " ".join(f"{k} {n}" for k, n in counts.items()) + rss)


async def _wait_idle(admin: httpx.AsyncClient, timeout_s: float = 30.0) -> bool:
    """Every slot free and nothing queued: no abandoned request kept running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        slots = (await admin.get(f"{API}/slots")).json()
        if slots["busy_slots"] == 0 and slots["queue_depth"] == 0:
            return True
        await asyncio.sleep(0.2)
    return False


async def _settled_fds(pid: int | None, before: int | None, timeout_s: float = 15.0
                       ) -> int | None:
    """Open fds once the server has closed the clients' connections (it may take a beat)."""
    deadline = time.monotonic() + timeout_s
    fds = _fds(pid)
    while fds is not None and before is not None and fds > before \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        fds = _fds(pid)
    return fds


async def _server_chats(admin: httpx.AsyncClient) -> int | None:
    """Chat requests the server has counted (vlserve_requests_total), if /metrics answers."""
    try:
        answer = await admin.get("/metrics")
    except httpx.HTTPError:
        return None
    if answer.status_code != 200:
        return None
    total = 0.0
    for line in answer.text.splitlines():
        if line.startswith("vlserve_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return round(total)


def _local_pid(base: str) -> int | None:
    parts = urlsplit(base)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    return probe.listening_pid(parts.port or 80)


def _fds(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return probe.open_fds(pid)
    except OSError:
        return None
