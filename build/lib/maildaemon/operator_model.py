"""The operator surface's rules: refusals, filters, cursors and the retry plan.

Pure logic shared by the HTTP API, the CLI and ``store/operator.py``; what they show is in
``operator_views``.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

from maildaemon.errors import MailDaemonError
from maildaemon.models import TERMINAL_STATUSES, AttemptStatus, DeliveryStatus
from maildaemon.operator_views import DeliveryDetail, DeliveryRecord, LastError, RetryPlan
from maildaemon.outcomes import RetryPolicy

DELIVERY_STATUSES: tuple[str, ...] = get_args(DeliveryStatus)
ATTEMPT_STATUSES: tuple[str, ...] = get_args(AttemptStatus)
REQUEUEABLE = frozenset({"dead_letter", "failed"})
CANCELLABLE = frozenset({"queued"})
GLOBAL_SCOPE = "*"

# --- refusals ----------------------------------------------------------------------------


class OperatorError(MailDaemonError):
    """The operator request was refused."""

    status = 500
    code = "error"

    def __init__(
        self, message: str | None = None, *, field: str | None = None, code: str | None = None
    ) -> None:
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
            if isinstance(value, datetime):
                value = value.isoformat()
            elif f.name == "reply_class" and value is not None:
                value = f"{value}xx"
            if value is not None:
                out[f.name] = value
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
    if not isinstance(values, list) or len(values) != len(shape) + 1 or values[0] != kind:
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


def delivery_detail(
    record: DeliveryRecord, policy: RetryPolicy, now: datetime | None = None
) -> DeliveryDetail:
    now = now or datetime.now(UTC)
    code, text = record.last_reply_code, record.last_reply_text
    # The last reply is an error unless the server accepted (2xx): then there is none.
    failed = code >= 400 if code is not None else text is not None
    error = LastError(code, text) if failed else None
    return DeliveryDetail(
        delivery_id=record.delivery_id,
        status=record.status,
        status_reason=record.status_reason,
        source=record.source,
        idempotency_key=record.idempotency_key,
        priority=priority_name(record.priority),
        payload_mode=record.payload_mode,
        template_id=record.template_id,
        locale=record.locale,
        recipients=record.recipients,
        send_at=record.send_at,
        expires_at=record.expires_at,
        created_at=record.created_at,
        updated_at=record.updated_at,
        rendered_at=record.rendered_at,
        finished_at=record.finished_at,
        attempt_count=record.attempt_count,
        possible_duplicate=record.possible_duplicate,
        message_id=record.message_id,
        stream_entry_id=record.stream_entry_id,
        last_error=error,
        attempts=record.attempts,
        dead_letter=record.dead_letter,
        retry_plan=retry_plan(record, policy, now),
    )


def spread_due_times(
    count: int, rate_per_second: float | None, start: datetime
) -> tuple[datetime | None, datetime | None]:
    """First and last due time of ``count`` requeued deliveries released at the rate."""
    if count == 0:
        return None, None
    gap = 1.0 / rate_per_second if rate_per_second else 0.0
    return start, start + timedelta(seconds=gap * (count - 1))
