"""A tiny stand-in for the Hugging Face Hub's file endpoint, on 127.0.0.1.

It answers what huggingface_hub's `hf_hub_download` asks for (HF_ENDPOINT pointed here):
HEAD and GET `/{repo}/resolve/{revision}/{filename}` with ETag (the content's SHA-256,
as the Hub does for Git-LFS files), X-Repo-Commit and Content-Length, and Range requests.
It records every request, can require a token, cut a transfer short once, or serve
corrupted bytes, so the tests exercise the real download code end to end.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    content: bytes
    cut_first_get: bool = False  # send half, then drop the connection (once)
    corrupt: bool = False  # serve flipped bytes under the genuine ETag

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased


@dataclass
class FakeHub:
    files: dict[str, HubFile] = field(default_factory=dict)  # "repo/filename" -> file
    token: str | None = None  # when set, requests need "Authorization: Bearer <token>"
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    def add(self, repo: str, filename: str, content: bytes, **kwargs: bool) -> HubFile:
        self.files[f"{repo}/{filename}"] = hub_file = HubFile(content, **kwargs)
        return hub_file

    def start(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, req: BaseHTTPRequestHandler, *, body: bool) -> None:
        self.seen.append(Seen(req.command, req.path,
                              {k.lower(): v for k, v in req.headers.items()}))
        if self.token and req.headers.get("Authorization") != f"Bearer {self.token}":
            req.send_response(401)
            req.send_header("X-Error-Message", "Invalid credentials")
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        repo_and_name = _resolve(unquote(req.path))
        hub_file = self.files.get(repo_and_name or "")
        if hub_file is None:
            req.send_response(404)
            req.send_header("X-Error-Code", "EntryNotFound")
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        data = hub_file.content
        if hub_file.corrupt:
            data = bytes(b ^ 0xFF for b in data)
        start = _range_start(req.headers.get("Range"))
        req.send_response(206 if start else 200)
        req.send_header("ETag", f'"{hub_file.sha256}"')
        req.send_header("X-Repo-Commit", COMMIT)
        req.send_header("Accept-Ranges", "bytes")
        req.send_header("Content-Length", str(len(data) - start))
        if start:
            req.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        req.end_headers()
        if not body:
            return
        if hub_file.cut_first_get and not start:
            hub_file.cut_first_get = False
            req.wfile.write(data[: len(data) // 2])
            req.wfile.flush()
            req.close_connection = True
            return
        req.wfile.write(data[start:])


def _resolve(path: str) -> str | None:
    """'/{org}/{repo}/resolve/{revision}/{filename}' -> '{org}/{repo}/{filename}'."""
    parts = path.split("?")[0].lstrip("/").split("/")
    if len(parts) < 5 or parts[2] != "resolve":
        return None
    return "/".join([parts[0], parts[1], *parts[4:]])


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    return int(header.removeprefix("bytes=").split("-")[0] or 0)
