"""API keys and CORS: which routes need a key, what 401 looks like, keys never leak."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import RunningServer, start_server, stop_server

from server.api.auth import bearer_token, is_protected
from server.api.routes import route_table
from server.app import create_app
from server.config import load_settings
from server.demo_model import DemoModelPaths
from server.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
KEY_A = "sk-test-alpha-0123456789"
KEY_B = "sk-test-bravo-9876543210"


def request(app: object, method: str, path: str, headers: dict[str, str] | None = None
            ) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)  # no lifespan: the engine stays unloaded
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, headers=headers)
    return asyncio.run(go())


def make_app(demo_model: DemoModelPaths, **overrides: object) -> object:
    # Named like the test servers (a demo file outside models/demo/ is not the preset's own).
    settings = load_settings(None, model=demo_model.text, mmproj=demo_model.mmproj,
                             **{"model_name": "vlserve-demo-llava", **overrides})
    return create_app(settings, Engine(settings))


@pytest.mark.parametrize("path, metrics_open, protected", [
    ("/api/v1/models", False, True),
    ("/v1/chat/completions", False, True),
    ("/api", False, True),
    ("/v1", False, True),
    ("/metrics", False, True),
    ("/metrics", True, False),
    ("/health", False, False),
    ("/health/", False, True),  # exactly /health: nothing hides behind its name
    ("/healthz", False, True),
    # The router's and the orchestrator's probes: liveness and the load count.
    ("/livez", False, False),
    ("/get_load", False, False),
    ("/get_load/", False, True),
    # The playground page and its files are open (they hold no data; the page's own API
    # calls carry the key its user types in), but nothing else under /playground.
    ("/", False, False),
    ("/playground", False, False),
    ("/playground/static/app.js", False, False),
    ("/playground/other", False, True),
    # Default deny: the API documents and anything else need a key too.
    ("/openapi.json", False, True),
    ("/docs", False, True),
    ("/redoc", False, True),
    ("/v1beta/models", False, True),
])
def test_protected_paths(path: str, metrics_open: bool, protected: bool) -> None:
    assert is_protected(path, metrics_open=metrics_open) is protected


@pytest.mark.parametrize("value, token", [
    (b"Bearer abc", b"abc"),
    (b"bearer   abc  ", b"abc"),
    (b"BEARER abc", b"abc"),
    (b"Basic abc", None),
    (b"Bearer", None),
    (b"Bearer ", None),
])
def test_bearer_token_parsing(value: bytes, token: bytes | None) -> None:
    assert bearer_token([(b"authorization", value)]) == token


def test_api_routes_need_a_key(demo_model: DemoModelPaths) -> None:
    app = make_app(demo_model, api_keys=[KEY_A, KEY_B])
    for path in ("/api/v1/models", "/v1/models", "/api/v1/models/vlserve-demo-llava"):
        missing = request(app, "GET", path)
        assert missing.status_code == 401, path
        error = missing.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        assert "Bearer" in error["message"]
        assert missing.headers["www-authenticate"] == "Bearer"
        for key in (KEY_A, KEY_B):
            ok = request(app, "GET", path, {"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200, path
    wrong = request(app, "GET", "/v1/models", {"Authorization": f"Bearer {KEY_A}x"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["message"] == "invalid API key"
    assert KEY_A not in wrong.text
    basic = request(app, "GET", "/v1/models", {"Authorization": f"Basic {KEY_A}"})
    assert basic.status_code == 401
    chat = request(app, "POST", "/api/v1/chat/completions")
    assert chat.status_code == 401  # auth comes before body validation


def test_websockets_under_the_api_are_refused_without_a_key(demo_model: DemoModelPaths
                                                            ) -> None:
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    with TestClient(make_app(demo_model, api_keys=[KEY_A])) as client, \
            pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/v1/ws"):
        pass
    assert closed.value.code == 1008


def test_only_health_stays_open(demo_model: DemoModelPaths) -> None:
    app = make_app(demo_model, api_keys=[KEY_A])
    assert request(app, "GET", "/health").status_code == 503  # loading, not 401
    assert request(app, "GET", "/no-such-page").status_code == 401
    authed = request(app, "GET", "/no-such-page", {"Authorization": f"Bearer {KEY_A}"})
    assert authed.status_code == 404


def test_no_route_is_reachable_without_a_key(demo_model: DemoModelPaths) -> None:
    """Every route the app has (API, aliases, documents), each method: 401 without a key."""
    app = make_app(demo_model, api_keys=[KEY_A])
    table = route_table(app.routes)
    assert {"/openapi.json", "/docs", "/redoc", "/v1/models", "/api/v1/files/{file_id}",
            "/metrics", "/health"} <= {r.path for r in table}  # the walk sees them all
    for route in table:
        route_path = route.path
        path = route_path.replace("{file_id}", "file-x").replace("{model_id:path}", "m")
        for method in sorted(route.methods):
            answer = request(app, method, path)
            if route_path == "/health":
                assert answer.status_code == 503  # open (loading), for probes
            elif route_path in ("/livez", "/get_load"):
                assert answer.status_code == 200  # open probes (README "Scaling out")
            elif route_path in ("/", "/playground"):
                assert answer.status_code != 401  # the page itself, open by design
            elif route_path == "/playground/static":  # the page's files: open, the rest not
                assert request(app, method, f"{path}/app.js").status_code == 200
                assert answer.status_code == 401
            else:
                assert answer.status_code == 401, (method, path)


def test_no_route_discovery_without_a_key(demo_model: DemoModelPaths) -> None:
    """OPTIONS and every other method get the same 401 on routes that exist and on paths
    that do not: no 405 with an Allow header tells which is which."""
    app = make_app(demo_model, api_keys=[KEY_A])
    answers = set()
    for path in ("/api/v1/files/file-x", "/v1/chat/completions", "/api/v1/models",
                 "/api/v1/no-such-route", "/nothing/here"):
        for method in ("OPTIONS", "PUT", "PATCH", "DELETE", "TRACE", "GET", "POST"):
            answer = request(app, method, path)
            assert answer.status_code == 401, (method, path, answer.text)
            assert "allow" not in answer.headers
            answers.add(answer.text)
    assert len(answers) == 1  # the same body everywhere
    # With the key, OPTIONS is answered as it was (405 naming the methods).
    authed = request(app, "OPTIONS", "/api/v1/files/file-x", {"Authorization": f"Bearer {KEY_A}"})
    assert authed.status_code == 405 and authed.headers["allow"]


def test_metrics_needs_a_key_unless_open(demo_model: DemoModelPaths) -> None:
    # 401 without a key; with the key, or once metrics_open, the metrics themselves (200,
    # Prometheus text), even while the model loads.
    closed = make_app(demo_model, api_keys=[KEY_A])
    refused = request(closed, "GET", "/metrics")
    assert refused.status_code == 401 and "vlserve_" not in refused.text
    authed = request(closed, "GET", "/metrics", {"Authorization": f"Bearer {KEY_A}"})
    assert authed.status_code == 200 and "vlserve_model_loaded 0.0" in authed.text
    opened = make_app(demo_model, api_keys=[KEY_A], metrics_open=True)
    answer = request(opened, "GET", "/metrics")
    assert answer.status_code == 200 and "vlserve_model_loaded 0.0" in answer.text


def test_no_keys_means_open(demo_model: DemoModelPaths) -> None:
    app = make_app(demo_model)
    assert request(app, "GET", "/v1/models").status_code == 200
    assert request(app, "GET", "/v1/models", {"Authorization": "Bearer anything"}
                   ).status_code == 200


def test_cors_only_for_configured_origins(demo_model: DemoModelPaths) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    app = make_app(demo_model, api_keys=[KEY_A], cors_origins=["https://app.example"])
    ok = request(app, "OPTIONS", "/api/v1/chat/completions", preflight)
    assert ok.status_code == 200  # preflights carry no key and must not get 401
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    denied = request(app, "GET", "/v1/models", {"Origin": "https://app.example"})
    assert denied.status_code == 401  # the 401 itself is readable by the allowed page
    assert denied.headers["access-control-allow-origin"] == "https://app.example"
    other = request(app, "OPTIONS", "/api/v1/chat/completions",
                    {**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    default = make_app(demo_model)
    plain = request(default, "GET", "/v1/models", {"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in plain.headers


@pytest.fixture(scope="module")
def keyed_server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[RunningServer]:
    """A real server whose keys come from VLSERVE_API_KEY (two, comma-separated)."""
    log_path = tmp_path_factory.mktemp("keyed") / "server.log"
    running = start_server(demo_model, log_path, env={"VLSERVE_API_KEY": f"{KEY_A},{KEY_B}"})
    yield running
    stop_server(running)


def test_real_server_with_keys_and_openai_sdk(keyed_server: RunningServer) -> None:
    good = openai.OpenAI(base_url=keyed_server.api, api_key=KEY_B, max_retries=0)
    reply = good.chat.completions.create(model="m", max_tokens=4,
                                         messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content is not None
    bad = openai.OpenAI(base_url=keyed_server.api, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    health = httpx.get(f"{keyed_server.url}/health")
    assert health.status_code == 200
    # No `server: uvicorn` header, on a served answer or a refused one.
    refused = httpx.options(f"{keyed_server.api}/files/x")
    assert refused.status_code == 401
    assert "server" not in health.headers and "server" not in refused.headers
    log = keyed_server.log()
    assert "2 key(s) configured" in log
    assert KEY_A not in log and KEY_B not in log and "sk-wrong" not in log
    # Which key a request came with: a digest, for per-key accounting in the log.
    digest = hashlib.sha256(KEY_B.encode()).hexdigest()[:12]
    assert any('"event": "chat_completion"' in line and f'"key": "{digest}"' in line
               for line in log.splitlines())


def test_refused_keys_are_counted_and_logged_without_flooding(keyed_server: RunningServer
                                                              ) -> None:
    """A client still on a rotated-out key (or a guesser) shows in the metrics and in one
    log warning per 10 s, which never holds the key."""
    def rejections() -> dict[str, float]:
        text = httpx.get(f"{keyed_server.url}/metrics", timeout=10,
                         headers={"Authorization": f"Bearer {KEY_A}"}).text
        return {reason: float(line.split()[-1]) for line in text.splitlines()
                for reason in ("missing", "invalid")
                if line.startswith(f'vlserve_auth_rejections_total{{reason="{reason}"}}')}

    before = rejections()
    for _ in range(5):
        assert httpx.get(f"{keyed_server.api}/models", timeout=10, headers={
            "Authorization": "Bearer sk-rotated-out"}).status_code == 401
    assert httpx.get(f"{keyed_server.api}/models", timeout=10).status_code == 401
    after = rejections()
    assert after["invalid"] - before["invalid"] == 5, (before, after)
    assert after["missing"] - before["missing"] == 1, (before, after)
    warnings = [line for line in keyed_server.log().splitlines() if "401 " in line
                and "API key from 127.0.0.1" in line]
    assert 1 <= len(warnings) <= 2, warnings  # one per 10 s window, not one per request
    assert "/api/v1/models" in warnings[-1] and "sk-rotated-out" not in keyed_server.log()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_smoke_script_sends_the_key(keyed_server: RunningServer) -> None:
    script = str(ROOT / "scripts" / "smoke.sh")
    env = {k: v for k, v in os.environ.items() if k != "VLSERVE_API_KEY"}
    without = subprocess.run(["bash", script, keyed_server.url], capture_output=True, text=True,
                             timeout=120, env=env)
    assert without.returncode != 0 and "/models returned 401" in without.stderr
    with_key = subprocess.run(["bash", script, keyed_server.url], capture_output=True,
                              text=True, timeout=120, env={**env, "VLSERVE_API_KEY": KEY_A})
    assert with_key.returncode == 0, with_key.stdout + with_key.stderr
