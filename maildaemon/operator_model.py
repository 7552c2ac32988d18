"""The operator surface's domain: filters, views, action results, refusals and the retry plan.

Pure values shared by the HTTP API, the CLI and ``store/operator.py``. Every view is a frozen
dataclass; ``dump`` turns one into its JSON form (snake_case names, ISO-8601 UTC times with
``Z``) and ``openapi.py`` derives the response schemas from the same classes.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import TypeAdapter

from maildaemon.errors import MailDaemonError
from maildaemon.models import TERMINAL_STATUSES
from maildaemon.outcomes import RetryPolicy

DELIVERY_STATUSES = ("queued", "rendered", "sending", "sent", "suppressed", "failed",
                     "dead_letter", "expired", "cancelled")
ATTEMPT_STATUSES = ("sent", "transport_failed", "timed_out", "provider_rejected", "unknown",
                    "suppressed", "failed", "expired")
REQUEUEABLE = frozenset({"dead_letter", "failed"})
CANCELLABLE = frozenset({"queued"})
GLOBAL_SCOPE = "*"

# --- refusals ----------------------------------------------------------------------------


class OperatorError(MailDaemonError):
    """The operator request was refused."""

    status = 500
    code = "error"

    def __init__(self, message: str | None = None, *, field: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        if code is not None:
            self.code = code


class InvalidInput(OperatorError):
    """A request field is invalid."""

    status = 400
    code = "invalid_input"


class NotFound(OperatorError):
    """No such object."""

    status = 404
    code = "not_found"


class Conflict(OperatorError):
    """The object is not in a state that allows this action."""

    status = 409
    code = "conflict"


class Unavailable(OperatorError):
    """This operation is not available right now."""

    status = 503
    code = "unavailable"


# --- filters and pages -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PageRequest:
    limit: int = 50
    after: tuple[Any, ...] | None = None  # the decoded cursor: the last key already seen


@dataclass(frozen=True, slots=True)
class DeliveryFilter:
    status: str | None = None
    source: str | None = None
    recipient: str | None = None  # lower-cased address
    created_after: datetime | None = None
    created_before: datetime | None = None


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    source: str | None = None
    recipient_domain: str | None = None  # lower-cased
    reply_code: int | None = None
    reply_class: int | None = None  # 4 for 4xx
    created_after: datetime | None = None
    created_before: datetime | None = None
    reviewed: bool | None = None
    requeued: bool | None = None

    def describe(self) -> dict[str, Any]:
        """The filter as recorded in the audit trail (only the fields given)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value.isoformat() if isinstance(value, datetime) else value
        return out


@dataclass(frozen=True, slots=True)
class MalformedFilter:
    failure_code: str | None = None
    source: str | None = None
    replayed: bool | None = None


@dataclass(frozen=True, slots=True)
class SuppressionFilter:
    address: str | None = None  # lower-cased
    domain: str | None = None  # lower-cased


@dataclass(frozen=True, slots=True)
class ActionFilter:
    action: str | None = None
    actor: str | None = None
    target: str | None = None


# --- cursors -----------------------------------------------------------------------------


def encode_cursor(kind: str, *key: Any) -> str:
    """An opaque, URL-safe cursor naming the last row of a page."""
    values = [v.isoformat() if isinstance(v, datetime) else v for v in key]
    text = json.dumps([kind, *values], separators=(",", ":"), ensure_ascii=True)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(text: str, kind: str, shape: tuple[type, ...]) -> tuple[Any, ...]:
    """The key of ``text``; InvalidInput (field ``cursor``) unless it is a ``kind`` cursor."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        values = json.loads(raw)
    except (binascii.Error, ValueError):
        raise InvalidInput("not a cursor returned by this listing", field="cursor") from None
    if (not isinstance(values, list) or len(values) != len(shape) + 1 or values[0] != kind):
        raise InvalidInput("not a cursor returned by this listing", field="cursor")
    key: list[Any] = []
    for value, kind_of in zip(values[1:], shape, strict=True):
        if kind_of is datetime:
            value = _cursor_time(value)
        if not _fits(value, kind_of):
            raise InvalidInput("not a cursor returned by this listing", field="cursor")
        key.append(value)
    return tuple(key)


def _cursor_time(value: Any) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return parsed if parsed is not None and parsed.tzinfo is not None else None


def _fits(value: Any, kind: type) -> bool:
    if kind is int:
        return type(value) is int and abs(value) < 2**63
    if kind is str:
        return type(value) is str and "\x00" not in value
    return type(value) is kind


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
class Recipients:
    to: list[str]
    cc: list[str]
    bcc: list[str]
    reply_to: str | None
    pending: list[str] | None  # still owed the message; null: all of them
    accepted_count: int


@dataclass(frozen=True, slots=True)
class LastError:
    reply_code: int | None
    reply_text: str | None


@dataclass(frozen=True, slots=True)
class RecipientResult:
    outcome: str
    code: int | None
    text: str | None


@dataclass(frozen=True, slots=True)
class Attempt:
    attempt_no: int
    status: str
    started_at: datetime
    finished_at: datetime
    reply_code: int | None
    reply_text: str | None
    recipients: dict[str, RecipientResult]
    worker: str | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    delivery_id: str
    created_at: datetime
    attempt_count: int
    last_status: str
    last_reply_code: int | None
    last_reply_text: str | None
    reviewed_at: datetime | None
    reviewed_by: str | None
    review_note: str | None
    requeued_at: datetime | None
    requeued_by: str | None


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One delivery row as the store reads it (input to the detail view)."""

    delivery_id: str
    source: str
    idempotency_key: str
    status: str
    status_reason: str | None
    priority: int
    payload_mode: str
    template_id: str | None
    locale: str | None
    recipients: Recipients
    send_at: datetime | None
    expires_at: datetime | None
    next_attempt_at: datetime | None
    attempt_count: int
    ladder_base: int
    possible_duplicate: bool
    last_reply_code: int | None
    last_reply_text: str | None
    message_id: str | None
    rendered_at: datetime | None
    stream_entry_id: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    paused: bool
    attempts: list[Attempt]
    dead_letter: DeadLetter | None


@dataclass(frozen=True, slots=True)
class DeliveryDetail:
    delivery_id: str
    status: str
    status_reason: str | None
    source: str
    idempotency_key: str
    priority: str
    payload_mode: str
    template_id: str | None
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


@dataclass(frozen=True, slots=True)
class DeliverySummary:
    delivery_id: str
    status: str
    status_reason: str | None
    source: str
    priority: str
    template_id: str | None
    to: list[str]
    attempt_count: int
    last_reply_code: int | None
    last_reply_text: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class DeliveryPage:
    items: list[DeliverySummary]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class DeadLetterItem:
    delivery_id: str
    source: str
    delivery_status: str
    template_id: str | None
    to: list[str]
    created_at: datetime
    attempt_count: int
    last_status: str
    last_reply_code: int | None
    last_reply_text: str | None
    reviewed_at: datetime | None
    reviewed_by: str | None
    review_note: str | None
    requeued_at: datetime | None
    requeued_by: str | None


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    items: list[DeadLetterItem]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class MalformedCommand:
    id: int
    stream_entry_id: str
    failure_code: str
    failure_detail: str
    delivery_id: str | None
    source: str | None
    raw: str
    raw_truncated: bool
    received_at: datetime
    replayed_at: datetime | None
    replayed_delivery_id: str | None


@dataclass(frozen=True, slots=True)
class MalformedPage:
    items: list[MalformedCommand]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class CommandTrace:
    """What became of one stream entry."""

    stream_entry_id: str
    outcome: Literal["delivery", "duplicate", "malformed"]
    delivery: DeliverySummary | None  # the delivery it created
    duplicate_of: str | None  # the delivery it was a replay of
    malformed: MalformedCommand | None


@dataclass(frozen=True, slots=True)
class Pause:
    scope: str  # "*" (all sources) or a source
    paused_at: datetime
    paused_by: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class SendingState:
    paused_globally: bool
    paused_sources: list[str]
    pauses: list[Pause]


@dataclass(frozen=True, slots=True)
class Backlog:
    due: int  # claimable now (paused ones included)
    oldest_due_age_seconds: float
    scheduled: int  # waiting for a later time (send_at or a retry)
    in_flight: int  # claimed, attempt running


@dataclass(frozen=True, slots=True)
class DeadLetterCounts:
    unreviewed: int
    open: int  # still dead-lettered (not requeued)
    total: int


@dataclass(frozen=True, slots=True)
class Stats:
    generated_at: datetime
    deliveries_by_status: dict[str, int]
    backlog: Backlog
    dead_letters: DeadLetterCounts
    malformed_commands_last_hour: int
    attempts_last_hour: dict[str, int]
    sending: SendingState


@dataclass(frozen=True, slots=True)
class Suppression:
    address: str
    reason: str
    reply_code: int | None
    source_delivery_id: str | None
    created_at: datetime
    expires_at: datetime | None
    created_by: str


@dataclass(frozen=True, slots=True)
class SuppressionPage:
    items: list[Suppression]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class OperatorAction:
    id: int
    at: datetime
    actor: str
    action: str
    target: str | None
    reason: str | None
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OperatorActionPage:
    items: list[OperatorAction]
    next_cursor: str | None


# --- action results ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveryChange:
    """A requeue or a cancel."""

    delivery_id: str
    previous_status: str
    status: str
    next_attempt_at: datetime | None
    action_id: int


@dataclass(frozen=True, slots=True)
class Review:
    delivery_id: str
    reviewed_at: datetime
    reviewed_by: str
    review_note: str
    action_id: int


@dataclass(frozen=True, slots=True)
class BulkRequeue:
    dry_run: bool
    matched: int  # dead letters matching the filter now
    requeued: int
    delivery_ids: list[str]
    first_due_at: datetime | None
    last_due_at: datetime | None
    rate_per_second: float | None
    action_id: int | None


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
class PauseChange:
    scope: str
    paused: bool
    changed: bool  # false when it already was in that state
    pause: Pause | None
    action_id: int


@dataclass(frozen=True, slots=True)
class SuppressionChange:
    address: str
    suppressed: bool
    suppression: Suppression | None
    action_id: int


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


# --- the retry plan ----------------------------------------------------------------------


def retry_plan(record: DeliveryRecord, policy: RetryPolicy, now: datetime) -> RetryPlan:
    """The ladder from here: attempts left and when the last would give up if all failed."""
    step = max(0, record.attempt_count - record.ladder_base)
    if record.status in TERMINAL_STATUSES or record.next_attempt_at is None:
        return RetryPlan(None, 0, None, step, False, record.paused)
    total = len(policy.ladder) + 1  # the first attempt, then one per rung
    in_flight = record.status == "sending" and record.next_attempt_at > now
    remaining = max(0, total - step)
    if in_flight:
        # Attempt `step` is running: should it fail, the ladder goes on from its rung.
        gives_up = policy.gives_up_at(max(step - 1, 0), now)
        nxt = None
    else:
        nxt = record.next_attempt_at
        gives_up = policy.gives_up_at(step, max(nxt, now))
    if record.expires_at is not None and gives_up > record.expires_at:
        gives_up = record.expires_at
    return RetryPlan(nxt, remaining, gives_up, step, in_flight, record.paused)


def priority_name(rank: int) -> str:
    return {0: "critical", 1: "high", 2: "normal", 3: "low"}.get(rank, str(rank))


def delivery_detail(record: DeliveryRecord, policy: RetryPolicy,
                    now: datetime | None = None) -> DeliveryDetail:
    now = now or datetime.now(UTC)
    error = (LastError(record.last_reply_code, record.last_reply_text)
             if record.last_reply_code is not None or record.last_reply_text is not None
             else None)
    return DeliveryDetail(
        delivery_id=record.delivery_id, status=record.status, status_reason=record.status_reason,
        source=record.source, idempotency_key=record.idempotency_key,
        priority=priority_name(record.priority), payload_mode=record.payload_mode,
        template_id=record.template_id, locale=record.locale, recipients=record.recipients,
        send_at=record.send_at, expires_at=record.expires_at, created_at=record.created_at,
        updated_at=record.updated_at, rendered_at=record.rendered_at,
        finished_at=record.finished_at, attempt_count=record.attempt_count,
        possible_duplicate=record.possible_duplicate, message_id=record.message_id,
        stream_entry_id=record.stream_entry_id, last_error=error, attempts=record.attempts,
        dead_letter=record.dead_letter, retry_plan=retry_plan(record, policy, now))


def spread_due_times(count: int, rate_per_second: float | None, start: datetime
                     ) -> tuple[datetime | None, datetime | None]:
    """First and last due time of ``count`` requeued deliveries released at the rate."""
    if count == 0:
        return None, None
    gap = 1.0 / rate_per_second if rate_per_second else 0.0
    return start, start + timedelta(seconds=gap * (count - 1))


# --- JSON --------------------------------------------------------------------------------


_ADAPTERS: dict[type[Any], TypeAdapter[Any]] = {}


def dump(value: Any) -> Any:
    """A view as plain JSON-ready data."""
    kind = type(value)
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        adapter = _ADAPTERS[kind] = TypeAdapter(kind)
    return adapter.dump_python(value, mode="json")
