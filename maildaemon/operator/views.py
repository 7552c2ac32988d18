"""What the operator surface shows: one frozen dataclass per JSON shape.

The HTTP API and ``maildaemon … --json`` print ``dump(view)`` (snake_case names, ISO-8601 UTC
times with ``Z``); ``openapi.py`` derives the response schemas from these same classes, so
the document cannot drift from the responses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import TypeAdapter

from maildaemon.store.operator.records import (
    Attempt,
    DeadLetter,
    LateOutcome,
    Recipients,
    ReportEntry,
)

# --- views -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPlan:
    """What the retry ladder has in store for the delivery (an estimate: jitter aside)."""

    next_attempt_at: datetime | None
    attempts_remaining: int
    gives_up_at: datetime | None
    ladder_step: int  # attempts since the ladder (re)started
    in_flight: bool  # an attempt is running now
    paused: bool  # sending is paused for its source (or globally)


@dataclass(frozen=True, slots=True)
class LastError:
    reply_code: int | None
    reply_text: str | None


@dataclass(frozen=True, slots=True)
class DeliveryDetail:
    delivery_id: str
    status: str
    status_reason: str | None
    failure_code: str | None
    source: str
    idempotency_key: str
    priority: str
    payload_mode: str
    template_id: str | None
    # Once rendered, the locale the template was rendered in (the command's, its language
    # or MAIL_DEFAULT_LOCALE); before, the command's (None when it named none).
    locale: str | None
    recipients: Recipients
    send_at: datetime | None
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    rendered_at: datetime | None
    finished_at: datetime | None
    attempt_count: int
    possible_duplicate: bool
    message_id: str | None
    stream_entry_id: str | None
    last_error: LastError | None
    attempts: list[Attempt]
    dead_letter: DeadLetter | None
    retry_plan: RetryPlan
    # Reports after the relay's 250 (bounces, delays, complaints) and what they did.
    reports: list[ReportEntry] = field(default_factory=list)
    late_outcomes: list[LateOutcome] = field(default_factory=list)


# --- action results ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayItem:
    id: int
    stream_entry_id: str
    outcome: Literal["accepted", "duplicate", "still_invalid"]
    delivery_id: str | None
    failure_code: str | None
    failure_detail: str | None


@dataclass(frozen=True, slots=True)
class Replay:
    dry_run: bool
    matched: int  # unreplayed records matching the filter
    accepted: int  # now deliveries (or duplicates of one); on a dry run: would be
    still_invalid: int
    items: list[ReplayItem]
    action_id: int | None


@dataclass(frozen=True, slots=True)
class Health:
    status: str


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    code: str
    message: str
    field: str | None = None


@dataclass(frozen=True, slots=True)
class ErrorBody:
    error: ErrorDetail


# --- JSON --------------------------------------------------------------------------------


_ADAPTERS: dict[type[Any], TypeAdapter[Any]] = {}


def dump(value: Any) -> Any:
    """A view as plain JSON-ready data."""
    kind = type(value)
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        adapter = _ADAPTERS[kind] = TypeAdapter(kind)
    return adapter.dump_python(value, mode="json")
