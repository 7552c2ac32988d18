"""What the webhook store returns: frozen records for the dispatcher and the operator."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An endpoint as the operator sees it: never its secret."""

    id: int
    url: str
    events: list[str] | None  # None: every event
    source: str | None  # None: every source
    enabled: bool
    disabled_reason: str | None
    backlog: int  # events waiting for it
    rotation_ends_at: datetime | None  # the previous secret signs too until then
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class EndpointSecret:
    """The answer to add and rotate-secret: the only time the secret is shown."""

    endpoint: Endpoint
    secret: str
    action_id: int | None


@dataclass(frozen=True, slots=True)
class EndpointChange:
    endpoint_id: int
    change: str  # enabled, disabled, removed, ping_queued
    event_id: int | None  # the ping's event (webhook-id msg_<id>)
    action_id: int | None


@dataclass(frozen=True, slots=True)
class Replay:
    endpoint_id: int
    dry_run: bool
    matched: int  # events the replay takes (dry run: would take)
    queued: int  # 0 on a dry run
    action_id: int | None


@dataclass(frozen=True, slots=True)
class Claim:
    """One event leased to the dispatcher for one endpoint."""

    queue_id: int
    claim_token: int
    endpoint_id: int
    event_id: int
    attempt_no: int
    event_type: str
    fields: str  # the event as JSON text
    created_at: datetime
    url: str
    secrets: tuple[str, ...]  # the current secret, then the previous one during a rotation


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt found: ``retry_in`` seconds until the next, ``exhausted`` when the
    schedule is over (the endpoint is disabled, the event kept)."""

    claim: Claim
    ok: bool
    http_status: int | None
    duration_ms: int
    error: str | None
    response: str | None
    retry_in: float
    exhausted: bool


@dataclass(frozen=True, slots=True)
class Disabled:
    endpoint_id: int
    url: str


@dataclass(frozen=True, slots=True)
class Backlog:
    endpoint_id: int
    enabled: bool
    waiting: int
    oldest_age_s: float


@dataclass(frozen=True, slots=True)
class WebhookAttempt:
    id: int
    endpoint_id: int
    event_id: int
    event_type: str
    delivery_id: str
    attempt_no: int
    ok: bool
    http_status: int | None
    duration_ms: int
    error: str | None
    response: str | None
    at: datetime


@dataclass(frozen=True, slots=True)
class EndpointList:
    items: list[Endpoint]


@dataclass(frozen=True, slots=True)
class AttemptList:
    items: list[WebhookAttempt]
