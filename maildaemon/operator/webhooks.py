"""The operator's webhook rules, shared by the HTTP actions and the CLI: the event names
an endpoint may filter on, the URL and target checks on add, a fresh secret on add and on
rotation (shown once, in that answer only), replay inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from maildaemon.errors import Conflict, InvalidInput
from maildaemon.operator import inputs
from maildaemon.store.operator.records import Actor
from maildaemon.store.webhooks.admin import WebhookAdmin
from maildaemon.store.webhooks.records import EndpointSecret, Replay
from maildaemon.webhooks import signing, targets

# The outcome events (the event stream's `status`), and the bounce, complaint and delay
# events a bounce processor adds.
EVENT_NAMES = (
    "sent",
    "retry_scheduled",
    "dead_letter",
    "failed",
    "expired",
    "suppressed",
    "cancelled",
    "bounced",
    "complained",
    "delayed",
)


@dataclass(frozen=True, slots=True)
class TargetRules:
    """What the daemon's settings allow (MAIL_WEBHOOK_ALLOW_HTTP, …_ALLOWED_NETWORKS)."""

    allow_http: bool
    allowed_networks: tuple[str, ...]
    secret_grace_s: float


def events(value: str | Sequence[str] | None) -> list[str] | None:
    """An event filter (comma list or list); None or empty: every event."""
    if value is None:
        return None
    names = value.split(",") if isinstance(value, str) else list(value)
    picked = sorted({n.strip() for n in names if n.strip()})
    unknown = [n for n in picked if n not in EVENT_NAMES]
    if unknown:
        raise InvalidInput(
            f"events: unknown {', '.join(unknown)}; known: {', '.join(EVENT_NAMES)}",
            field="events",
        )
    return picked or None


def endpoint_id(value: str | int) -> int:
    text = str(value)
    if not text.isdigit() or not 0 < int(text) < 2**63:
        raise InvalidInput("endpoint_id: must be a positive integer", field="endpoint_id")
    return int(text)


def event_id(value: str | int) -> int:
    text = str(value).removeprefix("msg_")
    if not text.isdigit() or not 0 < int(text) < 2**63:
        raise InvalidInput("event_id: must be msg_<n> or <n>", field="event_id")
    return int(text)


async def add(
    admin: WebhookAdmin,
    rules: TargetRules,
    url: str,
    event_names: list[str] | None,
    source: str | None,
    who: Actor,
    reason: str | None,
) -> EndpointSecret:
    parsed = targets.check_url(url)
    try:
        targets.check_scheme(parsed, rules.allow_http)
        await targets.check_target(parsed, targets.networks(rules.allowed_networks))
    except InvalidInput as exc:  # well-formed, refused by the daemon's settings or DNS
        raise Conflict(str(exc)) from None
    if source is not None:
        inputs.check(inputs.SOURCE, source, "source", "must be a source name")
    return await admin.add_endpoint(url, event_names, source, signing.new_secret(), who, reason)


async def rotate(
    admin: WebhookAdmin, rules: TargetRules, endpoint: int, who: Actor, reason: str | None
) -> EndpointSecret:
    return await admin.rotate_secret(
        endpoint, signing.new_secret(), rules.secret_grace_s, who, reason
    )


async def replay(
    admin: WebhookAdmin,
    endpoint: int,
    event: int | None,
    after: datetime | None,
    before: datetime | None,
    dry_run: bool,
    who: Actor,
    reason: str | None,
) -> Replay:
    if event is None and after is None and before is None:
        raise InvalidInput("replay: name an event, or a time range (after and/or before)")
    return await admin.replay_events(endpoint, event, after, before, dry_run, who, reason)
