"""What the store returns to the operator surface: one frozen dataclass per record shape.

Plain typed data built from rows (``store/operator/rows.py``); the HTTP API and the CLI
print them with ``operator.views.dump`` and ``http/openapi.py`` derives their schemas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from maildaemon.store.console.records import StatsSeries


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: the identity the audit records (from the token used, or the OS user for the
    CLI), and an optional free-text note the caller chose (kept in the action's detail)."""

    identity: str
    note: str | None = None


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
class Backlog:
    due: int  # claimable now (paused ones included)
    oldest_due_age_seconds: float
    scheduled: int  # waiting for a later time (send_at or a retry)
    in_flight: int  # claimed, attempt running


@dataclass(frozen=True, slots=True)
class BulkRequeue:
    dry_run: bool
    matched: int  # dead letters matching the filter now
    requeued: int  # 0 on a dry run
    would_requeue: int  # how many the limit lets this call take (dry run: would take)
    delivery_ids: list[str]  # requeued; on a dry run the first 100 that would be
    first_due_at: datetime | None
    last_due_at: datetime | None
    rate_per_second: float | None
    action_id: int | None


@dataclass(frozen=True, slots=True)
class CommandTrace:
    """What became of one stream entry."""

    stream_entry_id: str
    outcome: Literal["delivery", "duplicate", "malformed"]
    delivery: DeliverySummary | None  # the delivery it created
    duplicate_of: str | None  # the delivery it was a replay of
    malformed: MalformedCommand | None


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
class DeadLetterCounts:
    unreviewed: int
    open: int  # still dead-lettered (not requeued)
    total: int


@dataclass(frozen=True, slots=True)
class DeadLetterItem(DeadLetter):
    """A dead letter as a listing shows it: the record and what identifies its delivery."""

    source: str
    delivery_status: str
    template_id: str | None
    to: list[str]


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    items: list[DeadLetterItem]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class DeliveryChange:
    """A requeue or a cancel."""

    delivery_id: str
    previous_status: str
    status: str
    next_attempt_at: datetime | None
    action_id: int | None  # None on a dry run
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class DeliveryPage:
    items: list[DeliverySummary]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class ReportEntry:
    """A report (bounce, delay, complaint, ...) matched to the delivery: when it came, what
    it said per recipient and what it did (``maildaemon bounces show ID --raw``: its bytes)."""

    report_id: int
    received_at: datetime
    via: str
    kind: str
    match_status: str
    detail: str | None
    recipients: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class LateOutcome:
    """What reports did to one recipient after the relay's 250 (once per outcome)."""

    address: str
    outcome: str  # bounced, complained, delayed
    status_code: str | None
    diagnostic: str | None
    report_id: int
    at: datetime


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One delivery row as the store reads it (input to the detail view)."""

    delivery_id: str
    source: str
    idempotency_key: str
    status: str
    status_reason: str | None
    failure_code: str | None  # the daemon's own reason (see RUNBOOK "poison rows")
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
    reports: list[ReportEntry] = field(default_factory=list)
    late_outcomes: list[LateOutcome] = field(default_factory=list)


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


@dataclass(frozen=True, slots=True)
class Pause:
    scope: str  # "*" (all sources) or a source
    paused_at: datetime
    paused_by: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class PauseChange:
    scope: str
    paused: bool
    changed: bool  # false when it already was in that state
    pause: Pause | None
    action_id: int
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class RecipientResult:
    outcome: str
    code: int | None
    text: str | None


@dataclass(frozen=True, slots=True)
class Recipients:
    to: list[str]
    cc: list[str]
    bcc: list[str]
    reply_to: str | None
    pending: list[str] | None  # still owed the message; null: all of them
    accepted_count: int


@dataclass(frozen=True, slots=True)
class Review:
    delivery_id: str
    reviewed_at: datetime
    reviewed_by: str
    review_note: str
    action_id: int
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class SendingState:
    paused_globally: bool
    paused_sources: list[str]
    pauses: list[Pause]


@dataclass(frozen=True, slots=True)
class Stats:
    generated_at: datetime
    deliveries_by_status: dict[str, int]
    backlog: Backlog
    dead_letters: DeadLetterCounts
    malformed_commands_last_hour: int
    attempts_last_hour: dict[str, int]
    sending: SendingState
    series: StatsSeries | None = None  # with ?window=1h|24h: counts per interval


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
class SuppressionChange:
    address: str
    suppressed: bool
    suppression: Suppression | None
    action_id: int
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class SuppressionPage:
    items: list[Suppression]
    next_cursor: str | None
