"""The webhook endpoints over the operator API: list, attempts (reads); add, disable,
enable, remove, rotate-secret, test, replay (actions: an operator token, audited). A
secret appears in the answers to add and rotate-secret only."""

from __future__ import annotations

from aiohttp import web

from maildaemon.http.actions import _body, _who
from maildaemon.http.keys import SETTINGS_KEY
from maildaemon.http.respond import operator_store, reply
from maildaemon.operator import inputs
from maildaemon.operator import webhook_bodies as b
from maildaemon.operator import webhooks as ops
from maildaemon.store.webhooks.admin import WebhookAdmin


def _admin(request: web.Request) -> WebhookAdmin:
    return WebhookAdmin(operator_store(request).pool)


def _rules(request: web.Request) -> ops.TargetRules:
    s = request.app[SETTINGS_KEY]
    return ops.TargetRules(
        s.webhook_allow_http, tuple(s.webhook_allowed_networks), s.webhook_secret_grace
    )


def _id(request: web.Request) -> int:
    return ops.endpoint_id(request.match_info["endpoint_id"])


async def list_endpoints(request: web.Request) -> web.Response:
    return reply(await _admin(request).webhook_endpoints())


async def list_attempts(request: web.Request) -> web.Response:
    text = request.query.get("limit")
    limit = inputs.P_LIMIT.convert(text, "limit") if text is not None else inputs.DEFAULT_LIMIT
    return reply(await _admin(request).webhook_attempts(_id(request), limit))


async def add(request: web.Request) -> web.Response:
    body = await _body(request, b.WebhookAddBody)
    events = ops.events(body.events)
    added = await ops.add(
        _admin(request), _rules(request), body.url, events, body.source,
        _who(request, body), body.reason,
    )  # fmt: skip
    return reply(added)


async def disable(request: web.Request) -> web.Response:
    body = await _body(request, b.WebhookActionBody)
    change = await _admin(request).set_enabled(
        _id(request), False, _who(request, body), body.reason
    )
    return reply(change)


async def enable(request: web.Request) -> web.Response:
    body = await _body(request, b.WebhookActionBody)
    change = await _admin(request).set_enabled(_id(request), True, _who(request, body), body.reason)
    return reply(change)


async def remove(request: web.Request) -> web.Response:
    body = await _body(request, b.WebhookActionBody)
    return reply(await _admin(request).remove(_id(request), _who(request, body), body.reason))


async def rotate_secret(request: web.Request) -> web.Response:
    body = await _body(request, b.WebhookActionBody)
    rotated = await ops.rotate(
        _admin(request), _rules(request), _id(request), _who(request, body), body.reason
    )
    return reply(rotated)


async def test(request: web.Request) -> web.Response:
    body = await _body(request, b.WebhookActionBody)
    return reply(await _admin(request).ping(_id(request), _who(request, body), body.reason))


async def replay(request: web.Request) -> web.Response:
    body = await _body(request, b.WebhookReplayBody)
    done = await ops.replay(
        _admin(request), _id(request), body.event_id, body.after, body.before, body.dry_run,
        _who(request, body), body.reason,
    )  # fmt: skip
    return reply(done)
