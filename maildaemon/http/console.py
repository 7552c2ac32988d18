"""The operator console: static HTML, CSS and JavaScript shipped in the package
(``maildaemon/http/console/``), served at /console/ on the internal listener.

The console is a client of the HTTP API only. Its files are served with a strict Content
Security Policy (no inline script, nothing loaded from elsewhere; a message's HTML is shown
in a sandboxed frame), ``nosniff``, and ``no-cache`` so a new version is picked up at once.
"""

from __future__ import annotations

import hashlib
import logging
from functools import cache
from importlib import resources

from aiohttp import web

from maildaemon.logs import event

log = logging.getLogger("maildaemon.api")

CONSOLE_PATH = "/console/"
_TYPES = {
    ".html": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
}
# 'unsafe-inline' for styles only: a message's own inline CSS inside the sandboxed srcdoc
# frame (which inherits this policy). Scripts: this origin's files, nothing inline.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src data:; connect-src 'self'; frame-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


@cache
def files() -> dict[str, tuple[bytes, str, str]]:
    """Every console file: name -> (bytes, content type, ETag)."""
    folder = resources.files("maildaemon.http") / "console"
    out: dict[str, tuple[bytes, str, str]] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            data = entry.read_bytes()
            etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
            out[entry.name] = (data, _TYPES[suffix], etag)
    return out


async def redirect_home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(CONSOLE_PATH)


async def serve(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("name") or "index.html"
    found = files().get(name)
    if found is None and "index.html" not in files():
        # The package was built without its data files (package-data in pyproject.toml).
        event(log, "operator console files missing", logging.ERROR, path=request.path)
        raise web.HTTPServiceUnavailable(reason="the operator console is not installed")
    if found is None:
        raise web.HTTPNotFound(reason=f"no console file {name[:100]!r}")
    data, content_type, etag = found
    headers = {**SECURITY_HEADERS, "ETag": etag}
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    charset = "utf-8" if content_type.startswith("text/") else None
    return web.Response(body=data, content_type=content_type, charset=charset, headers=headers)


def register(app: web.Application) -> None:
    app.router.add_get("/", redirect_home)
    app.router.add_get("/console", redirect_home)
    app.router.add_get(CONSOLE_PATH, serve)
    app.router.add_get(CONSOLE_PATH + "{name}", serve)
