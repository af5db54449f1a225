"""The playground's tool box: calls shown as calls and sent back in the history (a server
with room for whole calls: random weights spend a token on nearly every character)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from conftest import CONSTRAINED_MAX_TOKENS, RunningServer, start_server, stop_server
from playwright.sync_api import Page, expect
from test_playground import STREAM_TIMEOUT_MS, browser, chat_bodies, page  # noqa: F401

from server.demo_model import DemoModelPaths


@pytest.fixture(scope="module")
def server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RunningServer]:
    """Replaces the default test server for this module's pages."""
    running = start_server(demo_model, tmp_path_factory.mktemp("tools-page") / "server.log",
                           env={"VLSERVE_MAX_TOKENS_CAP": str(CONSTRAINED_MAX_TOKENS)})
    yield running
    stop_server(running)


def test_tool_calls_are_shown_as_calls_and_kept_in_the_history(page: Page,  # noqa: F811
                                                                server: RunningServer) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"u": {"enum": ["c", "k"]}}, "required": ["u"],
        "additionalProperties": False}}}]
    bodies = chat_bodies(page)
    page.goto(f"{server.url}/playground")
    page.fill("#tools", json.dumps(tools))
    page.check("#tool-required")
    page.fill("#max-tokens", str(CONSTRAINED_MAX_TOKENS))  # room for a whole call
    # Greedy: the same (grammar-made) call every run.
    page.locator("#temperature").evaluate(
        "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
    page.fill("#prompt", "Call it.")
    page.click("#send")
    expect(page.locator(".timing").last).to_be_visible(timeout=STREAM_TIMEOUT_MS)
    call = page.locator(".msg.assistant .call").last
    expect(call).to_have_text(re.compile(r'^f\(\{ ?"u" ?: ?"[ck]" ?\}\)$'))
    assert bodies[-1]["tools"] == tools and bodies[-1]["tool_choice"] == "required"

    page.uncheck("#tool-required")
    page.fill("#tools", "")
    page.fill("#prompt", "Thanks.")
    page.click("#send")
    expect(page.locator(".timing")).to_have_count(2, timeout=STREAM_TIMEOUT_MS)
    sent = bodies[-1]["messages"][-2]
    assert sent["role"] == "assistant" and sent["content"] is None
    assert sent["tool_calls"][0]["function"]["name"] == "f"
    assert sent["tool_calls"][0]["id"].startswith("call_")
