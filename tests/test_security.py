"""Security checks: the route list, upload isolation, no way from a request to the local
filesystem or the network. (Keys on every route: test_auth.py; size limits: test_limits.py.)
"""

from __future__ import annotations

import base64
import http.server
import re
import secrets
import threading
from collections.abc import Iterator

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import data_url, image_message, photo_bytes

from server.api.routes import route_table
from server.app import create_app
from server.config import load_settings
from server.demo_model import DemoModelPaths
from server.engine import Engine, ImageInput
from server.uploads import UploadStore

KEY_A = "sk-tenant-a-0123456789"
KEY_B = "sk-tenant-b-9876543210"

# Every route the app serves. A new one fails this test on purpose: check it for auth
# (test_auth.py covers it by default) and for access to files or the network, then add it.
ROUTES = {
    ("/openapi.json", "GET"), ("/openapi.json", "HEAD"), ("/docs", "GET"), ("/docs", "HEAD"),
    ("/docs/oauth2-redirect", "GET"), ("/docs/oauth2-redirect", "HEAD"), ("/redoc", "GET"),
    ("/redoc", "HEAD"), ("/health", "GET"), ("/metrics", "GET"),
    # Open probes for the router and the orchestrator: a state word and a request count, no
    # request data (test_cluster_replica.py).
    ("/livez", "GET"), ("/get_load", "GET"),
    ("/", "GET"), ("/playground", "GET"), ("/playground/static", "GET"),  # the web page
    *((f"{prefix}{path}", method) for prefix in ("/api/v1", "/v1") for path, method in (
        ("/chat/completions", "POST"), ("/files", "POST"), ("/files", "GET"),
        ("/files/{file_id}", "GET"), ("/files/{file_id}", "DELETE"), ("/models", "GET"),
        ("/models/{model_id:path}", "GET"), ("/slots", "GET"),
        # The Responses API: images as chat's (no file:// URLs, http(s) only when enabled),
        # stored responses per key (test_key_quotas_and_views.py).
        ("/responses", "POST"), ("/responses/{response_id:response_id}", "GET"),
        ("/responses/{response_id:response_id}", "DELETE"),
        ("/responses/{response_id}/input_items", "GET"),
        # The token count of a /responses body: what the route itself reads, nothing kept
        # (test_input_tokens.py).
        ("/responses/input_tokens", "POST"),
        # Background responses: cancel one's generation (its owner's only) and read its
        # events again from memory (test_responses_background.py).
        ("/responses/{response_id}/cancel", "POST"),
        # Conversations: items kept as given (images fetched or decoded only when a response
        # reads them, by chat's rules), seen only by their key (test_key_quotas_and_views.py).
        ("/conversations", "POST"), ("/conversations/{conversation_id}", "GET"),
        ("/conversations/{conversation_id}", "POST"),
        ("/conversations/{conversation_id}", "DELETE"),
        ("/conversations/{conversation_id}/items", "GET"),
        ("/conversations/{conversation_id}/items", "POST"),
        ("/conversations/{conversation_id}/items/{item_id}", "GET"),
        ("/conversations/{conversation_id}/items/{item_id}", "DELETE"),
        # Batch jobs: batch files on disk, named only by ids of our own shape (store.py
        # _safe_id) and seen only by their owner; lines run as their batch's owner
        # (test_batches.py, test_batch_units.py).
        ("/files/{file_id}/content", "GET"), ("/batches", "POST"), ("/batches", "GET"),
        ("/batches/{batch_id}", "GET"), ("/batches/{batch_id}/cancel", "POST"),
        # Text completions: a text prompt only (no images, files or URLs), the chat
        # path's engine and limits (test_completions.py).
        ("/completions", "POST"),
        # Stored chat completions (`store: true`): kept as answered with the request's
        # messages, seen only by their key (test_stored_chat.py).
        ("/chat/completions", "GET"), ("/chat/completions/{completion_id}", "GET"),
        ("/chat/completions/{completion_id}", "POST"),
        ("/chat/completions/{completion_id}", "DELETE"),
        ("/chat/completions/{completion_id}/messages", "GET"),
        # Token counts and ids: text, or a chat's messages read as chat reads them
        # (test_tokenize.py).
        ("/tokenize", "POST"), ("/detokenize", "POST"))),
    ("/tokenize", "POST"), ("/detokenize", "POST"),  # the same, where vLLM serves them
}


def test_the_route_list_is_known(demo_model: DemoModelPaths) -> None:
    settings = load_settings(None, model=demo_model.text, mmproj=demo_model.mmproj)
    table = route_table(create_app(settings, Engine(settings)).routes)
    assert {(r.path, m) for r in table for m in r.methods} == ROUTES


def test_upload_ids_are_128_random_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    store = UploadStore(10_000, 1 << 30, 3600)
    image = ImageInput(b"\0" * 12, 2, 2, "h")
    ids = {store.add("a.png", "vision", 12, image).id for _ in range(2000)}
    assert len(ids) == 2000
    assert all(re.fullmatch(r"file-[0-9a-f]{32}", file_id) for file_id in ids)
    drawn: list[int] = []
    real = secrets.token_hex

    def token_hex(n: int) -> str:
        drawn.append(n)
        return real(n)

    monkeypatch.setattr(secrets, "token_hex", token_hex)
    store.add("a.png", "vision", 12, image)
    assert drawn == [16]  # from the OS's CSPRNG, 16 bytes


@pytest.fixture(scope="module")
def two_keys(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[RunningServer]:
    running = start_server(demo_model, tmp_path_factory.mktemp("tenants") / "server.log",
                           env={"VLSERVE_API_KEYS": f"{KEY_A},{KEY_B}"})
    yield running
    stop_server(running)


def client(key: str) -> httpx.Client:
    return httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_one_key_cannot_see_or_use_anothers_uploads(two_keys: RunningServer) -> None:
    api = two_keys.api
    with client(KEY_A) as a, client(KEY_B) as b:
        mine = a.post(f"{api}/files", files={"file": ("a.png", photo_bytes(40, 30))}).json()
        file_id = mine["id"]
        assert [f["id"] for f in a.get(f"{api}/files").json()["data"]] == [file_id]
        assert b.get(f"{api}/files").json()["data"] == []  # listing: own files only
        assert b.get(f"{api}/files/{file_id}").status_code == 404
        assert b.delete(f"{api}/files/{file_id}").status_code == 404
        chat = {"max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "file", "file": {"file_id": file_id}}]}]}
        refused = b.post(f"{api}/chat/completions", json=chat)
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "file_not_found"
        assert a.post(f"{api}/chat/completions", json=chat).status_code == 200
        assert a.delete(f"{api}/files/{file_id}").status_code == 200


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A loopback web server with an image: any request that reaches it is a failure."""

    hits: list[str] = []  # noqa: RUF012  (class-wide on purpose: shared with the test)
    image = photo_bytes(40, 30)

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.image)))
        self.end_headers()
        self.wfile.write(self.image)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def loopback_site() -> Iterator[str]:
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    _Recorder.hits.clear()
    yield f"127.0.0.1:{site.server_address[1]}"
    site.shutdown()
    site.server_close()


def test_remote_image_urls_are_refused_and_never_fetched(server: RunningServer,
                                                        loopback_site: str) -> None:
    """Remote fetch is not implemented: every URL form is a 400, and nothing is fetched
    (so no SSRF: not to loopback, private ranges, redirects or rebinding names)."""
    urls = [f"http://{loopback_site}/cat.png", f"https://{loopback_site}/cat.png",
            f"HTTP://{loopback_site}/cat.png", f"//{loopback_site}/cat.png",
            f"ftp://{loopback_site}/cat.png", f"gopher://{loopback_site}/", "file:///etc/passwd",
            "file:/etc/passwd", "/etc/passwd", "../../etc/passwd", "http://169.254.169.254/",
            "http://localhost/", "http://[::1]/", "data:text/plain;base64,cm9vdA=="]
    for url in urls:
        answer = httpx.post(f"{server.api}/chat/completions", timeout=30, json={
            "messages": [image_message("What is it?", url)], "max_tokens": 2})
        assert answer.status_code == 400, (url, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "invalid_image"
        assert error["param"] == "messages.0.content.1.image_url"
        answer = httpx.post(f"{server.api}/responses", timeout=30, json={
            "max_output_tokens": 2, "input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": url}]}]})
        assert answer.status_code == 400, (url, answer.text)
        assert answer.json()["error"]["param"] == "input.0.content.0.image_url"
        assert answer.json()["error"]["code"] == "invalid_image"
    assert _Recorder.hits == []


def test_no_request_reaches_the_filesystem(server: RunningServer) -> None:
    """File ids, model ids and odd paths are names in memory, never paths on disk."""
    passwd = base64.b64encode(b"/etc/passwd").decode()
    probes = [
        ("GET", "/api/v1/files/..%2F..%2F..%2Fetc%2Fpasswd"),
        ("GET", "/api/v1/files/../../../etc/passwd"),
        ("DELETE", "/api/v1/files/%2Fetc%2Fpasswd"),
        ("GET", "/api/v1/models/../../../../etc/passwd"),
        ("GET", "/api/v1/models/%2Fetc%2Fpasswd"),
        ("GET", "/static/../../etc/passwd"),
        ("GET", "/%2e%2e/%2e%2e/etc/passwd"),
        ("GET", "/models/demo/demo-llava-text.gguf"),
        ("GET", "/configs/default.yaml"),
        ("GET", "/api/v1/responses/..%2F..%2F..%2Fetc%2Fpasswd"),
        ("DELETE", "/api/v1/responses/%2Fetc%2Fpasswd"),
        ("GET", "/api/v1/responses/%2Fetc%2Fpasswd/input_items"),
    ]
    for method, path in probes:
        answer = httpx.request(method, f"{server.url}{path}", timeout=30)
        assert answer.status_code in (404, 405), (path, answer.status_code)
        assert "root:" not in answer.text and "GGUF" not in answer.text
    for file_id in ("../../../etc/passwd", "/etc/passwd", "file:///etc/passwd", passwd):
        chat = {"max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "file", "file": {"file_id": file_id}}]}]}
        answer = httpx.post(f"{server.api}/chat/completions", json=chat, timeout=30)
        assert answer.status_code == 400 and "root:" not in answer.text
        assert answer.json()["error"]["code"] == "file_not_found"
        answer = httpx.post(f"{server.api}/responses", timeout=30, json={
            "max_output_tokens": 2, "input": [{"role": "user", "content": [
                {"type": "input_image", "file_id": file_id}]}]})
        assert answer.status_code == 400 and "root:" not in answer.text
        assert answer.json()["error"]["code"] == "file_not_found"
    inline = httpx.post(f"{server.api}/chat/completions", timeout=30, json={
        "messages": [image_message("x", data_url(b"/etc/passwd"))], "max_tokens": 2})
    assert inline.status_code == 400 and "root:" not in inline.text
