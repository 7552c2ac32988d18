"""Operator API under /api/v1/internal: JSON replies and errors, the operator token.

Reads (``http.reads``) are open to the internal network. Actions (``http.actions``) need
``Authorization: Bearer <MAIL_OPERATOR_TOKEN>``; without a configured token they are
disabled (403). Every refusal is ``{"error": {"code", "message", "field"}}``; input a
client chose never causes a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from maildaemon.errors import OperatorError, StoreUnavailable
from maildaemon.http.keys import OPERATOR_KEY, SETTINGS_KEY
from maildaemon.logs import event
from maildaemon.operator.views import dump
from maildaemon.store.operator import OperatorStore

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
    except OperatorError as exc:
        return error_response(exc.status, exc.code, str(exc), exc.field)
    except StoreUnavailable as exc:
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


def guarded(handler: Handler) -> Handler:
    """An action: the operator token is required, and disabled when none is configured."""

    async def check(request: web.Request) -> web.StreamResponse:
        token = request.app[SETTINGS_KEY].operator_token
        if token is None or not token.get_secret_value():
            return error_response(
                403,
                "actions_disabled",
                "operator actions are disabled: MAIL_OPERATOR_TOKEN is not configured",
            )
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        expected = token.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), expected
        ):
            return error_response(
                401,
                "unauthorized",
                "Authorization: Bearer <MAIL_OPERATOR_TOKEN> required",
                field="Authorization",
                headers={"WWW-Authenticate": 'Bearer realm="maildaemon"'},
            )
        return await handler(request)

    return check


def reply(view: Any, status: int = 200) -> web.Response:
    return web.json_response(dump(view), status=status)


def operator_store(request: web.Request) -> OperatorStore:
    return request.app[OPERATOR_KEY]


def query_pairs(request: web.Request) -> list[tuple[str, str]]:
    return list(request.query.items())
