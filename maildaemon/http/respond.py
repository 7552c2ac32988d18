"""Operator API under /api/v1/internal: JSON replies and errors, the tokens.

Actions (``http.actions``) need ``Authorization: Bearer <token>`` with an operator token
(``MAIL_OPERATOR_TOKEN``, acting as ``operator``, or a ``name:secret`` of
``MAIL_OPERATOR_TOKENS``, acting as ``name``); without one configured they are disabled
(403). Reads (``http.reads``) are open to the internal network unless
``MAIL_OPERATOR_READ_TOKEN`` is set: then they need it or an operator token. The identity
of the token that matched is what the audit trail records. Every refusal is
``{"error": {"code", "message", "field"}}``; input a client chose never causes a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from maildaemon.errors import OperatorError, QueryTimeout, StoreUnavailable
from maildaemon.http.keys import OPERATOR_KEY, REFUSAL_KEY, SETTINGS_KEY
from maildaemon.logs import event
from maildaemon.operator.views import dump
from maildaemon.store.operator.actions import OperatorStore

log = logging.getLogger("maildaemon.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"code": code, "message": message, "field": field}}
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except QueryTimeout as exc:
        request.app[REFUSAL_KEY]("query_timeout")
        timeout = request.app[SETTINGS_KEY].api_statement_timeout
        event(
            log,
            "operator api: query timed out",
            logging.WARNING,
            path=request.path,
            timeout_s=timeout,
            error=str(exc),
        )
        return error_response(
            503,
            exc.code,
            f"the query took longer than MAIL_API_STATEMENT_TIMEOUT ({timeout:g}s) and was "
            "cancelled; narrow the filter or try again later",
            headers={"Retry-After": "5"},
        )
    except OperatorError as exc:
        return error_response(exc.status, exc.code, str(exc), exc.field)
    except StoreUnavailable as exc:
        request.app[REFUSAL_KEY]("store_unavailable")
        event(
            log,
            "operator api: postgres unavailable",
            logging.WARNING,
            error=str(exc),
            path=request.path,
        )
        return error_response(
            503,
            "store_unavailable",
            "PostgreSQL is unavailable; try again later",
            headers={"Retry-After": "5"},
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
        return error_response(
            exc.status, _HTTP_CODES.get(exc.status, "http_error"), exc.reason, headers=headers
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        event(
            log,
            "operator api: internal error",
            logging.ERROR,
            path=request.path,
            method=request.method,
            error=repr(exc),
            exc_info=exc,
        )
        return error_response(500, "internal_error", "internal error; see the daemon's log")


def _bearer(request: web.Request) -> bytes | None:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    return given.strip().encode("utf-8", "surrogateescape")


def _identity(given: bytes | None, tokens: dict[str, str]) -> str | None:
    """The identity of the token given (every configured token is compared)."""
    if given is None:
        return None
    found = None
    for secret, name in tokens.items():
        if hmac.compare_digest(given, secret.encode()):
            found = name
    return found


def _unauthorized(request: web.Request, needed: str) -> web.Response:
    request.app[REFUSAL_KEY]("unauthorized")
    event(
        log,
        "operator api: unauthorized",
        logging.WARNING,
        path=request.path,
        method=request.method,
        remote=request.remote,
    )
    return error_response(
        401,
        "unauthorized",
        f"Authorization: Bearer <{needed}> required",
        field="Authorization",
        headers={"WWW-Authenticate": 'Bearer realm="maildaemon"'},
    )


def guarded(handler: Handler) -> Handler:
    """An action: an operator token is required, and disabled when none is configured."""

    async def check(request: web.Request) -> web.StreamResponse:
        tokens = request.app[SETTINGS_KEY].operator_identities()
        if not tokens:
            return error_response(
                403,
                "actions_disabled",
                "operator actions are disabled: neither MAIL_OPERATOR_TOKEN nor "
                "MAIL_OPERATOR_TOKENS is configured",
            )
        if _identity(_bearer(request), tokens) is None:
            return _unauthorized(request, "operator token")
        return await handler(request)

    return check


def read_guarded(handler: Handler) -> Handler:
    """A read: open unless MAIL_OPERATOR_READ_TOKEN is set; then it or an operator token."""

    async def check(request: web.Request) -> web.StreamResponse:
        settings = request.app[SETTINGS_KEY]
        read_token = settings.read_token
        if read_token is not None:
            tokens = {**settings.operator_identities(), read_token: "reader"}
            if _identity(_bearer(request), tokens) is None:
                return _unauthorized(request, "MAIL_OPERATOR_READ_TOKEN or an operator token")
        return await handler(request)

    return check


def identity(request: web.Request) -> str:
    """Who acts: the identity of the operator token the request carries (``guarded`` let
    only such requests through)."""
    name = _identity(_bearer(request), request.app[SETTINGS_KEY].operator_identities())
    if name is None:  # not behind ``guarded``: a programming error, never client input
        raise RuntimeError("identity() needs a request that passed guarded()")
    return name


def reply(view: Any, status: int = 200) -> web.Response:
    return web.json_response(dump(view), status=status)


def operator_store(request: web.Request) -> OperatorStore:
    return request.app[OPERATOR_KEY]


def query_pairs(request: web.Request) -> list[tuple[str, str]]:
    return list(request.query.items())


def eml(data: bytes, filename: str) -> web.Response:
    """A stored message or report as a download (message/rfc822), never rendered inline."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", filename)[:120] or "message"
    return web.Response(
        body=data,
        content_type="message/rfc822",
        headers={
            "Content-Disposition": f'attachment; filename="{safe}.eml"',
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
        },
    )
