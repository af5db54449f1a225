"""Fetch `http(s)` image URLs safely (off unless `remote_images: true`).

Against SSRF: the host is resolved once, every address must be public (or inside
`remote_image_allow_networks`), and the connection goes to that very address, so a DNS
answer that changes between check and connect (rebinding) cannot redirect it. Redirects are
followed by hand, each target checked the same way. Bodies are capped while streaming.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urljoin, urlsplit

import httpx

from server.config import Settings
from server.images import ImageError, ImageTooLargeError

MAX_REDIRECTS = 3


async def fetch_image_bytes(url: str, settings: Settings) -> bytes:
    allowed = [ipaddress.ip_network(n, strict=False)
               for n in settings.remote_image_allow_networks]
    timeout = httpx.Timeout(settings.remote_image_timeout)
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False,
                                 trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            target, host, address = await _checked_target(url, allowed)
            headers = {"Host": host, "Accept": "image/*"}
            extensions = {"sni_hostname": urlsplit(url).hostname} if target.startswith(
                "https") else {}
            try:
                async with client.stream("GET", target, headers=headers,
                                         extensions=extensions) as response:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise ImageError(f"the image URL answered HTTP {response.status_code}")
                    return await _read_capped(response, settings.image_max_bytes)
            except httpx.HTTPError:
                raise ImageError(f"the image URL could not be fetched from {address}") from None
        raise ImageError(f"the image URL redirected more than {MAX_REDIRECTS} times")


async def _checked_target(url: str, allowed: list[ipaddress._BaseNetwork]
                          ) -> tuple[str, str, str]:
    """The URL rewritten to the one address it may connect to, its Host header, the address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageError("image URLs must be http(s) URLs with a host")
    if parts.username or parts.password:
        raise ImageError("image URLs must not carry credentials")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            parts.hostname, port, type=socket.SOCK_STREAM)
    except OSError:
        raise ImageError("the image URL's host could not be resolved") from None
    addresses = {info[4][0] for info in infos}
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not (ip.is_global or any(ip in net for net in allowed)):
            raise ImageError("the image URL points to a private or local address; refused")
    address = sorted(addresses)[0]
    literal = f"[{address}]" if ":" in address else address
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    path = parts.path or "/"
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{literal}:{port}{path}{query}", host, address


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ImageTooLargeError(f"the image at the URL is larger than {limit} bytes")
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise ImageTooLargeError(f"the image at the URL is larger than {limit} bytes")
    return bytes(body)
