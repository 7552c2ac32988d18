"""``maildaemon webhooks add|list|attempts|disable|enable|remove|rotate-secret|test|replay``:
the webhook endpoints, straight against PostgreSQL with the daemon's settings (MAIL_*),
checked exactly as the HTTP API checks them, each change audited as ``$USER@cli``. The
secret is printed by ``add`` and ``rotate-secret`` only."""

from __future__ import annotations

import argparse
from typing import Any

from maildaemon.cli import ops as cli
from maildaemon.cli import tables as t
from maildaemon.cli.declare import Commands, arg, operator_options
from maildaemon.config import Settings
from maildaemon.operator import inputs
from maildaemon.operator import webhooks as ops
from maildaemon.store.operator.actions import OperatorStore
from maildaemon.store.operator.records import Actor
from maildaemon.store.webhooks import records as r
from maildaemon.store.webhooks.admin import WebhookAdmin

command = Commands({"webhooks": "HTTP endpoints that receive outcome events"}, operator_options)
_ONE = (arg("endpoint_id", help="the endpoint's id (webhooks list)"),)


def register(sub: Any) -> None:
    command.install(sub)


def _rules(s: Settings) -> ops.TargetRules:
    return ops.TargetRules(
        s.webhook_allow_http, tuple(s.webhook_allowed_networks), s.webhook_secret_grace
    )


def _admin(store: OperatorStore) -> WebhookAdmin:
    return WebhookAdmin(store.pool)


def _text(view: Any) -> str:
    if isinstance(view, r.EndpointList):
        return t.table(
            ["id", "url", "events", "source", "enabled", "backlog", "why disabled"],
            [
                [e.id, e.url, ",".join(e.events or ["*"]), e.source or "*", e.enabled,
                 e.backlog, e.disabled_reason]
                for e in view.items
            ],
        )  # fmt: skip
    if isinstance(view, r.AttemptList):
        return t.table(
            ["at", "event", "type", "try", "ok", "status", "ms", "error"],
            [
                [t.when(a.at), f"msg_{a.event_id}", a.event_type, a.attempt_no, a.ok,
                 a.http_status, a.duration_ms, a.error]
                for a in view.items
            ],
        )  # fmt: skip
    if isinstance(view, r.EndpointSecret):
        e = view.endpoint
        return t.fields(
            [("endpoint", e.id), ("url", e.url), ("events", ",".join(e.events or ["*"])),
             ("source", e.source or "*"), ("secret", view.secret),
             ("previous secret signs until", t.when(e.rotation_ends_at)),
             ("note", "the secret is shown this once; keep it in the receiver's settings")]
        )  # fmt: skip
    pairs = [(k, v) for k, v in vars_of(view).items()]
    return t.fields(pairs)


def vars_of(view: Any) -> dict[str, Any]:
    return {name: getattr(view, name) for name in view.__slots__}


def _out(args: argparse.Namespace, view: Any) -> int:
    if args.json:
        return cli._out(args, view)
    print(_text(view))
    return 0


@command("webhooks list", "endpoints with their backlog (never their secrets)")
@cli._handler
def cmd_list(args: argparse.Namespace) -> int:
    return _out(args, cli._run(lambda store, _: _admin(store).webhook_endpoints()))


@command(
    "webhooks add",
    "add an endpoint (prints its signing secret, once)",
    arg("--url", required=True, help="https://… (http:// only with MAIL_WEBHOOK_ALLOW_HTTP)"),
    arg("--events", help=f"comma list of {', '.join(ops.EVENT_NAMES)} (default: all)"),
    arg("--source", help="only events of this source (default: all)"),
    action=True,
)
@cli._handler
def cmd_add(args: argparse.Namespace) -> int:
    events, who, reason = ops.events(args.events), cli._actor(args), cli._reason(args)
    return _out(
        args,
        cli._run(
            lambda store, s: ops.add(
                _admin(store), _rules(s), args.url, events, args.source, who, reason
            )
        ),
    )


@command(
    "webhooks attempts",
    "an endpoint's attempts, newest first",
    *_ONE,
    arg("--limit", type=int, default=inputs.DEFAULT_LIMIT, help="how many"),
)
@cli._handler
def cmd_attempts(args: argparse.Namespace) -> int:
    endpoint = ops.endpoint_id(args.endpoint_id)
    limit = inputs.P_LIMIT.convert(str(args.limit), "limit")
    return _out(args, cli._run(lambda store, _: _admin(store).webhook_attempts(endpoint, limit)))


def _acting_on(args: argparse.Namespace) -> tuple[int, Actor, str | None]:
    """The endpoint an action names, who acts, and why (from --actor / --reason)."""
    return ops.endpoint_id(args.endpoint_id), cli._actor(args), cli._reason(args)


def _switch(args: argparse.Namespace, enabled: bool) -> int:
    endpoint, who, reason = _acting_on(args)
    return _out(
        args, cli._run(lambda store, _: _admin(store).set_enabled(endpoint, enabled, who, reason))
    )


@command("webhooks disable", "stop sending to an endpoint (its events wait)", *_ONE, action=True)
@cli._handler
def cmd_disable(args: argparse.Namespace) -> int:
    return _switch(args, False)


@command("webhooks enable", "send again; waiting events are due now", *_ONE, action=True)
@cli._handler
def cmd_enable(args: argparse.Namespace) -> int:
    return _switch(args, True)


@command("webhooks remove", "remove an endpoint and what waits for it", *_ONE, action=True)
@cli._handler
def cmd_remove(args: argparse.Namespace) -> int:
    endpoint, who, reason = _acting_on(args)
    return _out(args, cli._run(lambda store, _: _admin(store).remove(endpoint, who, reason)))


@command(
    "webhooks rotate-secret",
    "a new secret (printed once); the old one signs too for MAIL_WEBHOOK_SECRET_GRACE",
    *_ONE,
    action=True,
)
@cli._handler
def cmd_rotate(args: argparse.Namespace) -> int:
    endpoint, who, reason = _acting_on(args)
    return _out(
        args, cli._run(lambda store, s: ops.rotate(_admin(store), _rules(s), endpoint, who, reason))
    )


@command("webhooks test", "queue a signed ping for an endpoint", *_ONE, action=True)
@cli._handler
def cmd_test(args: argparse.Namespace) -> int:
    endpoint, who, reason = _acting_on(args)
    return _out(args, cli._run(lambda store, _: _admin(store).ping(endpoint, who, reason)))


@command(
    "webhooks replay",
    "queue one event or a time range again for an endpoint",
    *_ONE,
    arg("--event", help="one event: its webhook-id (msg_123) or number"),
    arg("--after", help=f"events from this time on ({cli._TIME})"),
    arg("--before", help="events before this time"),
    arg("--dry-run", dest="dry_run", action="store_true", help="count only; queue nothing"),
    action=True,
)
@cli._handler
def cmd_replay(args: argparse.Namespace) -> int:
    endpoint = ops.endpoint_id(args.endpoint_id)
    event = ops.event_id(args.event) if args.event else None
    after = inputs.parse_time(args.after, "after") if args.after else None
    before = inputs.parse_time(args.before, "before") if args.before else None
    who, reason = cli._actor(args), cli._reason(args)
    return _out(
        args,
        cli._run(
            lambda store, _: ops.replay(
                _admin(store), endpoint, event, after, before, args.dry_run, who, reason
            )
        ),
    )
