"""The web playground: one static page at / and /playground that talks to the public API.

Plain files shipped in the package (no build step, nothing fetched from elsewhere), so the
page works offline and behind a firewall. It uses the same routes as any client, so it needs
no access of its own: with API keys on, the user types a key into the page.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

PAGE_DIR = Path(__file__).resolve().parent
STATIC_PREFIX = "/playground/static"

# Only our own files and the server it came from: a page that pulled anything from a CDN
# would break offline, and the CSP makes such a mistake fail loudly in the browser test.
_HEADERS = {
    "Cache-Control": "no-cache",  # revalidate (ETag), so an upgraded server shows its page
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


class _Assets(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = "no-cache"
        return response


async def _page() -> FileResponse:
    return FileResponse(PAGE_DIR / "index.html", media_type="text/html", headers=_HEADERS)


def mount_playground(app: FastAPI) -> None:
    """Serve the page at / and /playground and its assets under /playground/static."""
    for path in ("/", "/playground"):
        app.add_api_route(path, _page, methods=["GET"], include_in_schema=False)
    app.mount(STATIC_PREFIX, _Assets(directory=PAGE_DIR / "static"), name="playground-static")
