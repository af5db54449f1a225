"""The soak in CI: 16 clients for 30 s against the real server, as deployed.

The server runs as supervisor/ and the Dockerfile run it (MALLOC_ARENA_MAX=2), with API
keys on and a short queue, so that 401s for the keyless bad request and 429s with
Retry-After are part of the mix. The long run (64 clients, 5 minutes) is in the README.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import Stream, photo_bytes

from server.bench.soak.report import checks, table, verdict_counts
from server.bench.soak.runner import SoakPlan, _bounded_cache_bytes, run_soak
from server.demo_model import DemoModelPaths
from server.engine.scheduler import PREENCODE_BACKLOG

KEY = "sk-soak-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = 20_000  # tokens: a stream that keeps the engine busy while the test uploads


@pytest.fixture(scope="module")
def soak_server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[RunningServer]:
    running = start_server(demo_model, tmp_path_factory.mktemp("soak") / "server.log",
                           "--n-parallel", "4", "--n-ctx", str(LONG + 4096),
                           env={"VLSERVE_API_KEY": KEY, "VLSERVE_MAX_QUEUE": "4",
                                "VLSERVE_MAX_TOKENS_CAP": str(LONG), "MALLOC_ARENA_MAX": "2"})
    yield running
    stop_server(running)


def test_uploads_wait_for_encoding_in_a_bounded_backlog(soak_server: RunningServer) -> None:
    """Found by the soak: uploads are encoded ahead only when the engine is idle, and the
    backlog grew by a decoded image per upload for as long as the load lasted (+70 % RSS
    in two minutes)."""
    api = soak_server.api
    busy = Stream(api, {"messages": [{"role": "user", "content": "Go on."}],
                        "temperature": 0, "max_tokens": LONG}, headers=AUTH)
    assert busy.started.wait(60)
    with httpx.Client(headers=AUTH, timeout=60) as client:
        for seed in range(3 * PREENCODE_BACKLOG):
            upload = client.post(f"{api}/files", files={"file": (
                "a.png", photo_bytes(48, 32, seed=1000 + seed))})
            assert upload.status_code == 200
            client.delete(f"{api}/files/{upload.json()['id']}")
        slots = client.get(f"{api}/slots").json()
    assert slots["busy_slots"] >= 1, "the engine went idle: the test proves nothing"
    assert slots["preencode_backlog"] <= PREENCODE_BACKLOG
    busy.hang_up()


@pytest.mark.slow
def test_soak_16_clients_30_s(soak_server: RunningServer) -> None:
    plan = SoakPlan(url=soak_server.url, api_key=KEY, clients=16, duration_s=30,
                    warmup_s=15, max_tokens=16)
    run = asyncio.run(run_soak(plan, report=lambda line: None))
    text = table(run)
    print(text)
    counts = verdict_counts(run.outcomes)
    assert counts["ok"] and counts["bad_4xx"] and counts["abandoned"], text
    failed = [c for c in checks(run) if not c.passed]
    assert not failed, text
    assert {c.name for c in checks(run)} >= {"RSS growth", "open fds", "server counted"}, text


def test_the_rss_check_leaves_out_every_bounded_cache() -> None:
    """Filling the RAM prompt cache or the decoded-pixel cache is not a leak: the soak
    subtracts what /metrics says both hold."""
    metrics = ("# HELP vlserve_prompt_cache_ram_bytes ...\n"
               "vlserve_prompt_cache_ram_bytes 1000.0\n"
               "vlserve_image_pixel_cache_bytes 234.0\n"
               "vlserve_image_pixel_cache_hits_total 7.0\n")

    async def scrape() -> int:
        transport = httpx.MockTransport(lambda _: httpx.Response(200, text=metrics))
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as admin:
            return await _bounded_cache_bytes(admin)

    assert asyncio.run(scrape()) == 1234
