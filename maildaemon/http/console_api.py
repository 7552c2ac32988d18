"""API reads added for the operator console: the pinned message (``.eml`` and parsed),
malformed records by delivery id, the dev inbox, template preview and the stats series.

Reads like those in ``http.reads`` (the same rules apply to them); nothing here writes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from maildaemon.errors import (
    Conflict,
    MailDaemonError,
    NotFound,
    Unavailable,
)
from maildaemon.http.keys import (
    CATALOG_KEY,
    CONSOLE_KEY,
    DEV_MAILDIR_KEY,
    PREVIEW_GATE_KEY,
    REFUSAL_KEY,
    SETTINGS_KEY,
)
from maildaemon.http.respond import eml, error_response, operator_store, query_pairs, reply
from maildaemon.message.compose import Composer
from maildaemon.message.preview import DEFAULT_SENDER, render_preview
from maildaemon.operator import inbox, inputs, mailview
from maildaemon.store.operator.records import MalformedPage

STATS_PARAMS = (
    inputs.Param(
        "window",
        {"type": "string", "enum": ["1h", "24h"]},
        "Add counts per interval over this window: per minute for 1h, per 15 minutes for 24h.",
        inputs._enum(("1h", "24h")),
    ),
)
INBOX_PARAMS = (
    inputs.Param(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": inbox.MAX_LIMIT, "default": 100},
        "How many of the newest caught messages.",
        inputs._int(1, inbox.MAX_LIMIT),
    ),
)
_TEMPLATE_ID = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
_LOCALE = r"^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8}){0,3}$"
_VAR = r"^[A-Za-z_][A-Za-z0-9_]{0,63}=[^\x00]{0,10000}$"
TEMPLATE_ID = _TEMPLATE_ID
PREVIEW_PARAMS = (
    inputs.Param(
        "locale",
        inputs._string(_LOCALE),
        "Locale, e.g. de or pt-BR (default: the catalog's default locale).",
        inputs._text(_LOCALE, "must be a locale such as de or pt-BR"),
    ),
    inputs.Param(
        "var",
        inputs._string(_VAR),
        "A template variable NAME=VALUE; repeat for more.",
        inputs._text(_VAR, "must be NAME=VALUE"),
    ),
)


@dataclass(frozen=True, slots=True)
class CaughtMessage:
    name: str
    message: mailview.MessageView


@dataclass(frozen=True, slots=True)
class Preview:
    template_id: str
    locale: str | None
    message: mailview.MessageView | None  # None: it cannot be rendered with these values
    error: str | None  # why not (e.g. a variable is missing), as a delivery would fail


async def get_stats(request: web.Request) -> web.Response:
    query = inputs.parse_query(query_pairs(request), STATS_PARAMS)
    stats = await operator_store(request).stats()
    if query["window"] is not None:
        stats = replace(stats, series=await request.app[CONSOLE_KEY].series(query["window"]))
    return reply(stats)


async def _pinned(request: web.Request) -> tuple[str, bytes]:
    delivery_id = inputs.delivery_id(request.match_info["delivery_id"])
    inputs.parse_query(query_pairs(request), ())
    pinned = await request.app[CONSOLE_KEY].pinned_message(delivery_id)
    if pinned is None:
        raise NotFound(f"no delivery {delivery_id!r}", field="delivery_id")
    if pinned.data is None:
        raise Conflict(
            f"delivery {delivery_id!r} ({pinned.status}) has not been rendered yet: "
            "the message is rendered and pinned at its first attempt",
            code="not_rendered",
        )
    return delivery_id, pinned.data


async def get_message(request: web.Request) -> web.Response:
    delivery_id, data = await _pinned(request)
    return eml(data, delivery_id)


async def get_rendered(request: web.Request) -> web.Response:
    _, data = await _pinned(request)
    return reply(await asyncio.to_thread(mailview.view, data))


async def get_delivery_malformed(request: web.Request) -> web.Response:
    delivery_id = inputs.delivery_id(request.match_info["delivery_id"])
    inputs.parse_query(query_pairs(request), ())
    items = await request.app[CONSOLE_KEY].malformed_for_delivery(delivery_id)
    return reply(MalformedPage(items, None))


def _maildir(request: web.Request) -> Path:
    maildir = request.app.get(DEV_MAILDIR_KEY)
    if maildir is None:
        raise NotFound("the dev inbox exists only under `maildaemon dev`", code="dev_inbox_off")
    return maildir


async def list_inbox(request: web.Request) -> web.Response:
    maildir = _maildir(request)
    query = inputs.parse_query(query_pairs(request), INBOX_PARAMS)
    page = await asyncio.to_thread(inbox.listing, maildir, query["limit"] or 100)
    return reply(page)  # names the maildir by its folder name, never its absolute path


async def get_caught(request: web.Request) -> web.Response:
    maildir, name = _maildir(request), request.match_info["name"]
    inputs.parse_query(query_pairs(request), ())
    data = await asyncio.to_thread(inbox.read_message, maildir, name)
    return reply(CaughtMessage(name, await asyncio.to_thread(mailview.view, data)))


async def get_caught_raw(request: web.Request) -> web.Response:
    maildir, name = _maildir(request), request.match_info["name"]
    inputs.parse_query(query_pairs(request), ())
    data = await asyncio.to_thread(inbox.read_message, maildir, name)
    return eml(data, name.removesuffix(".eml"))


def preview_variables(pairs: list[str]) -> dict[str, Any]:
    variables: dict[str, Any] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        variables[name] = value
    return variables


async def get_preview(request: web.Request) -> web.Response:
    pairs = list(request.query.items())
    singles = [(k, v) for k, v in pairs if k != "var"]
    query = inputs.parse_query(singles, PREVIEW_PARAMS)
    template_id = inputs.check(
        TEMPLATE_ID, request.match_info["template_id"], "template_id", "must be a template id"
    )
    var_spec = PREVIEW_PARAMS[1]
    variables = preview_variables([var_spec.convert(v, "var") for k, v in pairs if k == "var"])
    catalog = request.app.get(CATALOG_KEY)
    if catalog is None:
        raise Unavailable("preview needs the daemon's template catalog", code="preview_unavailable")
    sender = request.app[SETTINGS_KEY].smtp_from or DEFAULT_SENDER
    locale = query["locale"]
    if template_id not in catalog.template_ids:
        raise NotFound(f"no template {template_id!r} in the catalog", field="template_id")
    gate = request.app[PREVIEW_GATE_KEY]
    wait = gate.admit()
    if wait is not None:
        request.app[REFUSAL_KEY]("rate_limited")
        return error_response(
            429,
            "rate_limited",
            "too many template previews; try again later (MAIL_INTERNAL_HTTP_PREVIEW_RATE)",
            headers={"Retry-After": str(wait)},
        )
    composer = Composer(catalog, sender)
    return reply(await gate.render(lambda: _preview(composer, template_id, locale, variables)))


def _preview(
    composer: Composer, template_id: str, locale: str | None, variables: dict[str, Any]
) -> Preview:
    """Render and parse one preview (in a worker thread: it costs CPU)."""
    try:
        data = render_preview(composer, template_id, locale, variables)
    except MailDaemonError as exc:  # a missing variable, a template that raises: the result
        return Preview(template_id, locale, None, str(exc))
    return Preview(template_id, locale, mailview.view(data), None)
