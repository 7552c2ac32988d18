"""The operator surface's rules: refusals, filters, cursors and the retry plan.

Pure logic shared by the HTTP API, the CLI and ``store/operator/actions.py``; what they show is in
``operator_views``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from maildaemon.delivery import TERMINAL_STATUSES
from maildaemon.operator.views import DeliveryDetail, LastError, RetryPlan
from maildaemon.retry import RetryPolicy
from maildaemon.store.operator.filters import priority_name
from maildaemon.store.operator.records import DeliveryRecord

# --- refusals ----------------------------------------------------------------------------


# --- filters and pages -------------------------------------------------------------------


# --- cursors -----------------------------------------------------------------------------


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
        failure_code=record.failure_code,
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
        reports=record.reports,
        late_outcomes=record.late_outcomes,
    )
