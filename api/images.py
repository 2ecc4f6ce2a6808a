"""Images sent to the API as ``image_url``: ``data:`` URLs always, ``http(s)`` only when allowed and public.

A remote URL is fetched only with ``--allow-remote-images``, and even then the host's addresses are
resolved first and refused when any of them is loopback, private, link-local, multicast or
reserved; the connection then goes to the address that was checked (not to a second lookup), so
a DNS answer that changes in between cannot point the server at itself (server-side request
forgery). Redirects are not followed. What comes back is written to a temporary file that the
caller removes, and opened with the same checks as an upload.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import socket
import ssl
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from api.errors import ApiError

FETCH_TIMEOUT = 10.0


def save_image_url(url, settings) -> Path:
    """The image behind ``url`` in a temporary file (the caller deletes it); ApiError when refused."""
    if not isinstance(url, str) or not url:
        raise ApiError(400, "image_url.url must be a data: URL or an http(s) URL", param="image_url")
    limit = settings.max_upload_mb * 1024**2
    if url.startswith("data:"):
        data = _decode_data_url(url, limit)
    elif urlsplit(url).scheme in ("http", "https"):
        if not settings.allow_remote_images:
            raise ApiError(400, "Remote image URLs are off on this server: send the image as a data: URL "
                                "(base64), or start the workbench with --allow-remote-images.", param="image_url")
        data = _fetch_public(url, limit)
    else:
        raise ApiError(400, "image_url.url must be a data: URL or an http(s) URL", param="image_url")
    folder = settings.cache_dir / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix="api-image-", delete=False) as handle:
        handle.write(data)
    return Path(handle.name)


def _decode_data_url(url: str, limit: int) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ApiError(400, "A data: URL image must be base64: data:image/png;base64,...", param="image_url")
    if len(payload) > limit * 4 // 3 + 4:
        raise ApiError(413, f"The image is over the {limit // 1024**2} MB upload limit.", param="image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "The data: URL's base64 payload is broken (not valid base64).",
                       param="image_url") from None


def public_address(host: str, port: int) -> str:
    """An address of ``host`` that is public; ApiError when the host resolves to any non-public address."""
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise ApiError(400, f"The image URL's host {host!r} cannot be resolved.", param="image_url") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_global:
            raise ApiError(400, f"Refused: the image URL's host resolves to {address}, a loopback, private, "
                                "link-local or reserved address.", param="image_url")
    if not addresses:
        raise ApiError(400, f"The image URL's host {host!r} has no address.", param="image_url")
    return addresses[0]


def _fetch_public(url: str, limit: int) -> bytes:
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    host = parts.hostname or ""
    address = public_address(host, port)
    sock = socket.create_connection((address, port), timeout=FETCH_TIMEOUT)
    if secure:
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
    connection = http.client.HTTPConnection(host, port, timeout=FETCH_TIMEOUT)
    connection.sock = sock  # already connected to the checked address: no second lookup
    try:
        path = parts.path or "/"
        connection.request("GET", f"{path}?{parts.query}" if parts.query else path,
                           headers={"Host": parts.netloc, "User-Agent": "multimodal-workbench"})
        response = connection.getresponse()
        if response.status != 200:
            raise ApiError(400, f"The image URL answered HTTP {response.status}; redirects are not followed.",
                           param="image_url")
        data = response.read(limit + 1)
    except OSError as exc:
        raise ApiError(400, f"The image URL could not be fetched ({exc.__class__.__name__}).",
                       param="image_url") from None
    finally:
        connection.close()
    if len(data) > limit:
        raise ApiError(413, f"The image is over the {limit // 1024**2} MB upload limit.", param="image_url")
    return data
