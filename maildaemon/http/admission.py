"""What a request must pass before any route runs: a Host the listener answers to, then its
body read in full within ``MAIL_INTERNAL_HTTP_BODY_TIMEOUT`` (and within
``MAIL_INTERNAL_HTTP_MAX_BODY_BYTES``, aiohttp's ``client_max_size``).

The Host check stops DNS rebinding: a web page an operator visits can point its own name
at 127.0.0.1, but the browser still sends that name as Host, and it is answered
``421 Misdirected Request``. A missing or malformed Host is ``400``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from maildaemon.config_values import host_name
from maildaemon.http.keys import REFUSAL_KEY
from maildaemon.http.respond import Handler, error_response
from maildaemon.http.throttle import ThrottledEvent

log = logging.getLogger("maildaemon.http")


def host_check(allowed: frozenset[str], log_interval: float) -> Middleware:
    """Answer only requests whose Host (any port) is in ``allowed`` ("*": any); an
    HTTP/1.0 request without Host (a plain probe, never a browser) is answered too."""
    misdirected = ThrottledEvent(log, "internal http host refused", log_interval)
    anything = "*" in allowed

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.getall("Host", [])
        if not given and request.version < (1, 1):
            # HTTP/1.0 may omit Host (RFC 1945), and a browser never does: no rebinding.
            return await handler(request)
        if len(given) != 1:
            return _refuse(request, 400, "bad_host", "exactly one Host header is required")
        try:
            name = host_name(given[0])
        except ValueError:
            return _refuse(request, 400, "bad_host", "the Host header is malformed")
        if name == "*" or not (anything or name in allowed):
            misdirected(host=given[0][:100], path=request.path[:200], remote=request.remote)
            return _refuse(
                request,
                421,
                "misdirected_request",
                "this listener does not answer to that Host; see MAIL_INTERNAL_HTTP_ALLOWED_HOSTS",
            )
        return await handler(request)

    return check


def _refuse(request: web.Request, status: int, code: str, message: str) -> web.Response:
    request.app[REFUSAL_KEY](code)
    response = error_response(status, code, message, field="Host")
    response.force_close()
    return response


def body_deadline(
    timeout: float, on_timeout: Callable[[str, str | None, float], None]
) -> Middleware:
    """Read a request's whole body before its handler runs, within ``timeout``: a client
    that trickles its body is answered 408 and its connection closed."""

    @web.middleware
    async def read_body(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists:
            try:
                async with asyncio.timeout(timeout):
                    await request.read()  # kept: request.json() and .text() reuse it
            except TimeoutError:
                on_timeout("body", request.remote, timeout)
                request.app[REFUSAL_KEY]("body_timeout")
                response = error_response(
                    408,
                    "request_timeout",
                    f"the request body did not arrive within {timeout:g}s "
                    "(MAIL_INTERNAL_HTTP_BODY_TIMEOUT)",
                )
                response.force_close()
                return response
        return await handler(request)

    return read_body
