"""The playground against real servers in the states its status line and errors describe:
API keys on, and a model still loading (issue 15, Build 4: no stubbed routes)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, RunningServer, start_server, stop_server, wait_ready
from playwright.sync_api import Browser, Page, expect
from test_playground import STREAM_TIMEOUT_MS, browser  # noqa: F401  (Chromium, or why not)

from server.demo_model import DemoModelPaths

KEY = "sk-playground-key"
FAULTY = (str(ROOT / "tests" / "faulty_server.py"),)


@pytest.fixture(scope="module")
def keyed(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[RunningServer]:
    running = start_server(demo_model, tmp_path_factory.mktemp("keyed-page") / "server.log",
                           env={"VLSERVE_API_KEY": KEY})
    yield running
    stop_server(running)


def open_page(browser: Browser, url: str) -> tuple[Page, list[str]]:  # noqa: F811
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.goto(url)
    return page, problems


def test_a_key_protected_server_asks_for_the_key_then_answers(
        browser: Browser, keyed: RunningServer) -> None:  # noqa: F811
    page, problems = open_page(browser, f"{keyed.url}/")
    sent: list[str | None] = []
    page.on("request", lambda r: sent.append(r.headers.get("authorization"))
            if r.url.endswith("/chat/completions") else None)
    expect(page.locator("#status")).to_have_attribute("data-state", "ready")
    expect(page.locator("#status-text")).to_contain_text("API key required for model info")

    page.fill("#prompt", "Hello?")
    page.click("#send")
    expect(page.locator(".bubble.error")).to_have_text(
        "This server requires an API key (401: missing API key: send it as "
        "'Authorization: Bearer <key>'). Enter it in the API key field.")

    page.fill("#api-key", "sk-wrong")
    page.click("#send")
    expect(page.locator(".bubble.error").nth(1)).to_have_text(
        "The server rejected the API key (401: invalid API key). Check the API key field.")

    page.fill("#api-key", KEY)
    page.click("#send")
    answer = page.locator(".msg.assistant").last
    expect(answer.locator(".stat-tokens")).to_have_text(re.compile(r"^[1-9]\d* tokens$"),
                                                        timeout=STREAM_TIMEOUT_MS)
    assert sent == [None, "Bearer sk-wrong", f"Bearer {KEY}"]
    page.context.close()
    assert not problems, problems


def test_a_loading_server_says_warming_up_then_ready(
        browser: Browser, demo_model: DemoModelPaths, tmp_path: Path) -> None:  # noqa: F811
    release = tmp_path / "loaded"
    server = start_server(demo_model, tmp_path / "server.log", launcher=FAULTY, ready=False,
                          env={"VLSERVE_TEST_FAULT_HOLD_LOAD": str(release)})
    try:
        health = None
        for _ in range(600):  # up to a minute for the process to listen
            try:
                health = httpx.get(f"{server.url}/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert health is not None and health.status_code == 503
        assert health.json() == {"status": "loading"}
        page, problems = open_page(browser, f"{server.url}/")
        expect(page.locator("#status")).to_have_attribute("data-state", "warming")
        expect(page.locator("#status-text")).to_contain_text("warming up")
        page.fill("#prompt", "Hello?")
        page.click("#send")
        expect(page.locator(".bubble.error")).to_contain_text(
            "The model is not ready yet (503: ")
        release.touch()
        wait_ready(server)
        # The page polls /health every 2 s while not ready.
        expect(page.locator("#status")).to_have_attribute("data-state", "ready",
                                                          timeout=STREAM_TIMEOUT_MS)
        expect(page.locator("#status-text")).to_contain_text("vlserve-demo-llava")
        page.context.close()
        assert not problems, problems
    finally:
        stop_server(server)
