"""The web playground: served at / and /playground, and driven in a real headless Chromium.

The browser is Debian's `chromium` (.ci/run installs it), driven by Playwright for Python
through `executable_path`: no browser download. The browser tests skip, saying why, only
when that browser is missing or does not start.

A screenshot of the page after an image question lands in the test's tmp dir; set
VLSERVE_TEST_PLAYGROUND_SCREENSHOT=docs/playground.png to refresh the README's copy.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, RunningServer
from fastapi.testclient import TestClient
from helpers import photo_bytes, skip_unless_ci
from playwright.sync_api import Browser, Page, Request, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from server.app import create_app
from server.config import load_settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# The demo model is tiny, but 2 shared cores and other suites running make it slow at times.
STREAM_TIMEOUT_MS = 60_000


# ---------- without a browser ----------

@pytest.mark.parametrize("path", ["/", "/playground"])
def test_page_is_served(server: RunningServer, path: str) -> None:
    page = httpx.get(f"{server.url}{path}", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="playground/static/app.js">' in page.text
    # Nothing but the server itself: the page must work offline.
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace(server.url, "")
    for asset, mime in [("app.js", "javascript"), ("style.css", "text/css")]:
        served = httpx.get(f"{server.url}/playground/static/{asset}", timeout=10)
        assert served.status_code == 200 and mime in served.headers["content-type"]


def test_playground_false_turns_the_page_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLSERVE_PLAYGROUND", "false")
    settings = load_settings(ROOT / "configs" / "default.yaml")
    assert settings.playground is False
    client = TestClient(create_app(settings))  # no lifespan: the engine never starts
    for path in ("/", "/playground", "/playground/static/app.js"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "not_found_error"
    assert client.get("/health").json() == {"status": "loading"}  # the API stays


# ---------- in Chromium ----------

@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        skip_unless_ci(f"browser tests need Chromium at {CHROMIUM}: "
                       "apt-get install -y chromium (.ci/run does it when run as root)")
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except PlaywrightError as exc:
            first_line = str(exc).strip().splitlines()[0]
            skip_unless_ci(f"Chromium at {CHROMIUM} does not start: {first_line}")
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, server: RunningServer) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith((server.url, "data:", "blob:"))
            else outside.append(r.url))
    yield page
    context.close()
    # An HTTP error status logs a console line too; the error tests cause theirs on purpose.
    problems = [p for p in problems if not p.startswith("Failed to load resource")]
    assert not problems, f"JavaScript errors: {problems}"
    assert not outside, f"the page reached beyond the server: {outside}"


def chat_bodies(page: Page) -> list[dict]:
    """Every chat request the page sends, as parsed JSON, filled in as they go out."""
    bodies: list[dict] = []

    def record(request: Request) -> None:
        if request.url.endswith("/chat/completions"):
            bodies.append(json.loads(request.post_data or "{}"))

    page.on("request", record)
    return bodies


def chat_sessions(page: Page) -> list[str | None]:
    """The X-Session-ID header of every chat request the page sends."""
    sessions: list[str | None] = []

    def record(request: Request) -> None:
        if request.url.endswith("/chat/completions"):
            sessions.append(request.headers.get("x-session-id"))

    page.on("request", record)
    return sessions


def test_image_question_streams_an_answer_with_stage_timings(
        page: Page, server: RunningServer, tmp_path: Path) -> None:
    sent = chat_bodies(page)
    sessions = chat_sessions(page)
    page.goto(f"{server.url}/")
    expect(page.locator("#status")).to_have_attribute("data-state", "ready")
    expect(page.locator("#status-text")).to_contain_text("vlserve-demo-llava")
    # Placement as llama.cpp reported it (meta.placement), not as the settings assumed it.
    expect(page.locator("#status-text")).to_contain_text(
        "LLM on CPU · vision on CPU · flash attn on · KV f16")

    picture = tmp_path / "gradient.png"
    picture.write_bytes(photo_bytes(480, 320, seed=8))
    page.set_input_files("#file-input", picture)
    state = page.locator(".chip .chip-state")
    expect(state).to_have_text(re.compile("^(uploaded|encoded)$"))
    # Encoded while the user types: the question then skips the vision encoder.
    expect(state).to_have_text("encoded", timeout=STREAM_TIMEOUT_MS)

    page.fill("#system", "Answer in one short sentence.")
    page.fill("#prompt", "What is in this picture?")
    with page.expect_response(re.compile(r"/chat/completions$")) as answered:
        page.click("#send")
    assert answered.value.headers["content-type"].startswith("text/event-stream")
    first = page.locator(".msg.assistant").nth(0)
    expect(first.locator(".timing .bar .seg").first).to_be_visible(timeout=STREAM_TIMEOUT_MS)
    expect(first.locator(".stat-tokens")).to_have_text(re.compile(r"^[1-9]\d* tokens$"))
    expect(first.locator(".stat-hits")).to_have_text("1 image from cache")
    assert first.locator(".text").inner_text().strip()
    assert page.locator(".msg.user img").count() == 1  # the thumbnail stays in the chat
    labels = first.locator(".legend").inner_text()
    assert "prompt eval" in labels and "generation" in labels
    assert "decode 0 ms" in labels and "encode 0 ms" in labels  # done at upload time
    assert first.locator(".ttft").get_attribute("title").startswith("first token after")
    save_screenshot(page, tmp_path)

    # A follow-up re-sends the whole conversation, same file id, so the prefix is cached.
    page.fill("#prompt", "And which colours does it have?")
    page.locator("#prompt").press("Enter")
    second = page.locator(".msg.assistant").nth(1)
    expect(second.locator(".stat-cached")).to_have_text(re.compile(r"[1-9]\d* cached"),
                                                        timeout=STREAM_TIMEOUT_MS)
    assert len(sent) == 2
    file_id = sent[0]["messages"][1]["content"][1]["file"]["file_id"]
    assert [m["role"] for m in sent[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert sent[1]["messages"][1] == sent[0]["messages"][1]
    assert sent[1]["messages"][1]["content"][1]["file"]["file_id"] == file_id
    assert sent[1]["messages"][2]["content"] == first.locator(".text").inner_text()
    assert sent[0]["stream"] is True and sent[0]["stream_options"] == {"include_usage": True}

    # One X-Session-ID per conversation (a router keeps it on one replica); a new chat, a
    # new one.
    assert sessions[0] and re.fullmatch(r"playground-[0-9a-f]{32}", sessions[0])
    assert sessions[1] == sessions[0]
    page.click("#new-chat")
    page.fill("#prompt", "A new topic.")
    page.locator("#prompt").press("Enter")
    expect(page.locator(".msg.assistant").nth(0).locator(".stat-tokens")).to_have_text(
        re.compile(r"^[1-9]\d* tokens$"), timeout=STREAM_TIMEOUT_MS)
    assert len(sessions) == 3 and sessions[2] and sessions[2] != sessions[0]


def save_screenshot(page: Page, tmp_path: Path) -> None:
    page.locator("#prompt").blur()
    path = tmp_path / "playground.png"
    page.screenshot(path=path)
    print(f"screenshot: {path}")
    if os.environ.get("VLSERVE_TEST_PLAYGROUND_SCREENSHOT"):
        page.screenshot(path=os.environ["VLSERVE_TEST_PLAYGROUND_SCREENSHOT"])


def test_server_errors_are_shown_readably(page: Page, server: RunningServer,
                                          tmp_path: Path) -> None:
    page.goto(f"{server.url}/playground")
    picture = tmp_path / "gone.png"
    picture.write_bytes(photo_bytes(64, 64, seed=9))
    with page.expect_response(re.compile(r"/files$")) as uploaded:
        page.set_input_files("#file-input", picture)
    file_id = uploaded.value.json()["id"]
    expect(page.locator(".chip .chip-state")).to_have_text(re.compile("^(uploaded|encoded)$"))
    httpx.delete(f"{server.api}/files/{file_id}", timeout=10).raise_for_status()

    page.fill("#prompt", "Still there?")
    page.click("#send")
    error = page.locator(".bubble.error")
    expect(error).to_have_text(re.compile(r"^Error 400: messages\.0\.content\.1\.file\.file_id: "
                                          f"no uploaded file '{file_id}'"),
                               timeout=STREAM_TIMEOUT_MS)
    # The failed turn goes back into the composer, so that Send retries it.
    expect(page.locator("#prompt")).to_have_value("Still there?")
    expect(page.locator(".chip")).to_have_count(1)


def test_answer_format_box_makes_the_answer_json(page: Page, server: RunningServer) -> None:
    """The JSON Schema box becomes response_format: random weights then answer a document
    valid against it; a box that isn't JSON is explained and the turn kept for a retry."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    bodies = chat_bodies(page)
    page.goto(f"{server.url}/playground")
    page.fill("#schema", "{not json")
    page.fill("#prompt", "Is it ok?")
    page.click("#send")
    expect(page.locator(".bubble.error")).to_contain_text("The answer format is not valid JSON")
    expect(page.locator("#prompt")).to_have_value("Is it ok?")
    assert bodies == []  # nothing was sent

    page.fill("#schema", json.dumps(schema))
    page.click("#send")
    answer = page.locator(".msg.assistant .text").last
    expect(page.locator(".timing").last).to_be_visible(timeout=STREAM_TIMEOUT_MS)
    assert json.loads(answer.text_content() or "") in ({"ok": True}, {"ok": False})
    assert bodies[-1]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
