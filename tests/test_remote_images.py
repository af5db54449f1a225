"""http(s) image URLs: off by default; when on, fetched safely (no private addresses, each
redirect re-checked, size capped), against a fake image host on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import image_message, photo_bytes

from server.demo_model import DemoModelPaths

PNG = photo_bytes(96, 64, seed=9)
SLOW_S = 30.0  # the fake host's slow route; the server gives up after FETCH_TIMEOUT_S
FETCH_TIMEOUT_S = 1.0
PRIVATE = "the image URL points to a private or local address; refused"


class FakeImageHost(BaseHTTPRequestHandler):
    hosts: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        FakeImageHost.hosts.append(self.headers.get("Host", ""))
        port = self.server.server_address[1]
        if self.path == "/slow":
            time.sleep(SLOW_S)  # answers nothing meanwhile
        routes = {
            "/cat.png": (200, {"Content-Type": "image/png"}, PNG),
            "/hop": (302, {"Location": "/cat.png"}, b""),
            "/to-private": (302, {"Location": f"http://127.0.0.2:{port}/cat.png"}, b""),
            "/huge": (200, {"Content-Length": str(1 << 30)}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/two-hops": (302, {"Location": "/hop"}, b""),
        }
        status, headers, body = routes.get(self.path, (404, {}, b"missing"))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeImageHost)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield int(httpd.server_address[1])
    httpd.shutdown()


@pytest.fixture(scope="module")
def fetching_server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[RunningServer]:
    running = start_server(demo_model, tmp_path_factory.mktemp("remote") / "server.log", env={
        "VLSERVE_REMOTE_IMAGES": "true",
        "VLSERVE_REMOTE_IMAGE_TIMEOUT": str(FETCH_TIMEOUT_S),
        # Loopback is private: only this explicit allow-list lets the fake host through.
        "VLSERVE_REMOTE_IMAGE_ALLOW_NETWORKS": '["127.0.0.1/32", "::1/128"]'})
    yield running
    stop_server(running)


def ask(server: RunningServer, url: str) -> httpx.Response:
    body = {"messages": [image_message("What is it?", url)], "max_tokens": 2}
    return httpx.post(f"{server.api}/chat/completions", json=body, timeout=60)


def test_fetches_an_allowed_image_and_follows_a_checked_redirect(
        fetching_server: RunningServer, image_host: int) -> None:
    direct = ask(fetching_server, f"http://127.0.0.1:{image_host}/cat.png")
    assert direct.status_code == 200, direct.text
    assert direct.json()["timings"]["image_tokens"] == 64
    assert ask(fetching_server, f"http://127.0.0.1:{image_host}/hop").status_code == 200


def test_connects_to_the_resolved_address_with_the_original_host(
        fetching_server: RunningServer, image_host: int) -> None:
    FakeImageHost.hosts.clear()
    assert ask(fetching_server, f"http://localhost:{image_host}/cat.png").status_code == 200
    assert FakeImageHost.hosts == [f"localhost:{image_host}"]


# Every failed fetch is a 400 too, so each refusal is told apart by its reason.
@pytest.mark.parametrize("path, status, reason", [
    ("/to-private", 400, PRIVATE),  # a redirect into a private address is checked, refused
    ("/huge", 413, "the image at the URL is larger than"),
    ("/nothing-here", 400, "the image URL answered HTTP 404"),
    ("/loop", 400, "the image URL redirected more than 3 times"),
])
def test_refusals(fetching_server: RunningServer, image_host: int, path: str,
                  status: int, reason: str) -> None:
    resp = ask(fetching_server, f"http://127.0.0.1:{image_host}{path}")
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == "messages.0.content.1.image_url"
    assert reason in resp.json()["error"]["message"]


def test_two_redirects_are_within_the_limit(fetching_server: RunningServer,
                                            image_host: int) -> None:
    resp = ask(fetching_server, f"http://127.0.0.1:{image_host}/two-hops")
    assert resp.status_code == 200, resp.text


def test_a_host_that_does_not_answer_times_out(fetching_server: RunningServer,
                                               image_host: int) -> None:
    started = time.monotonic()
    resp = ask(fetching_server, f"http://127.0.0.1:{image_host}/slow")
    assert resp.status_code == 400, resp.text
    assert "could not be fetched from 127.0.0.1" in resp.json()["error"]["message"]
    # remote_image_timeout (1 s) ended it, not the host (30 s): generous for a loaded box.
    assert time.monotonic() - started < SLOW_S / 2


@pytest.mark.parametrize("url, reason", [
    ("http://10.1.2.3/cat.png", PRIVATE),  # private
    ("http://127.0.0.2/x.png", PRIVATE),  # loopback outside the allow-list
    ("http://169.254.169.254/latest/meta-data/", PRIVATE),  # link-local (cloud metadata)
    ("http://[::ffff:127.0.0.2]/x.png", PRIVATE),  # loopback spelled as mapped IPv6
    ("http://user:pw@127.0.0.1/x.png", "image URLs must not carry credentials"),
    ("ftp://127.0.0.1/x", "unsupported image URL scheme"),
    ("http:///x.png", "image URLs must be http(s) URLs with a host"),
])
def test_private_link_local_and_odd_urls_are_refused(fetching_server: RunningServer,
                                                      url: str, reason: str) -> None:
    resp = ask(fetching_server, url)
    assert resp.status_code == 400, resp.text
    assert reason in resp.json()["error"]["message"], resp.text


def test_off_by_default(server: RunningServer, image_host: int) -> None:
    FakeImageHost.hosts.clear()
    resp = ask(server, f"http://127.0.0.1:{image_host}/cat.png")
    assert resp.status_code == 400 and "not enabled" in resp.json()["error"]["message"]
    assert FakeImageHost.hosts == []  # nothing was fetched
