"""The retry plan shown with a delivery: attempts left and when the ladder would give up."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from maildaemon.operator.model import delivery_detail, retry_plan
from maildaemon.retry import RetryPolicy
from maildaemon.store.operator.records import DeliveryRecord, Recipients

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy((30.0, 120.0, 600.0), 0.1)


def record(**fields: object) -> DeliveryRecord:
    base = DeliveryRecord(
        delivery_id="d-1",
        source="authsession",
        idempotency_key="k",
        status="queued",
        status_reason=None,
        failure_code=None,
        priority=2,
        payload_mode="template",
        template_id="signin_code",
        locale="en",
        recipients=Recipients(["a@example.com"], [], [], None, None, 0),
        send_at=None,
        expires_at=None,
        next_attempt_at=NOW,
        attempt_count=0,
        ladder_base=0,
        possible_duplicate=False,
        last_reply_code=None,
        last_reply_text=None,
        message_id=None,
        rendered_at=None,
        stream_entry_id="1-0",
        created_at=NOW,
        updated_at=NOW,
        finished_at=None,
        paused=False,
        attempts=[],
        dead_letter=None,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def test_a_new_delivery_has_the_whole_ladder_ahead() -> None:
    plan = retry_plan(record(), POLICY, NOW)
    assert (plan.next_attempt_at, plan.attempts_remaining, plan.ladder_step) == (NOW, 4, 0)
    assert plan.gives_up_at == NOW + timedelta(seconds=750)
    assert not plan.in_flight


def test_a_retry_counts_the_rungs_already_used() -> None:
    due = NOW + timedelta(seconds=120)
    plan = retry_plan(record(attempt_count=2, next_attempt_at=due), POLICY, NOW)
    assert plan.attempts_remaining == 2
    assert plan.gives_up_at == due + timedelta(seconds=600)


def test_a_requeue_starts_the_ladder_over_but_keeps_the_attempts() -> None:
    plan = retry_plan(record(attempt_count=4, ladder_base=4), POLICY, NOW)
    assert (plan.attempts_remaining, plan.ladder_step) == (4, 0)


def test_an_attempt_in_flight_shows_what_follows_if_it_fails() -> None:
    lease = NOW + timedelta(seconds=120)
    plan = retry_plan(record(status="sending", attempt_count=1, next_attempt_at=lease), POLICY, NOW)
    assert plan.in_flight and plan.next_attempt_at is None
    assert plan.attempts_remaining == 3
    assert plan.gives_up_at == NOW + timedelta(seconds=750)


def test_an_overdue_retry_is_estimated_from_now() -> None:
    plan = retry_plan(
        record(attempt_count=3, next_attempt_at=NOW - timedelta(hours=1)), POLICY, NOW
    )
    assert plan.attempts_remaining == 1 and plan.gives_up_at == NOW


def test_expiry_caps_the_estimate() -> None:
    expires = NOW + timedelta(seconds=60)
    assert retry_plan(record(expires_at=expires), POLICY, NOW).gives_up_at == expires


@pytest.mark.parametrize("status", ["sent", "dead_letter", "failed", "cancelled", "expired"])
def test_terminal_deliveries_have_nothing_left(status: str) -> None:
    plan = retry_plan(
        record(status=status, attempt_count=2, next_attempt_at=None, paused=True), POLICY, NOW
    )
    assert (plan.next_attempt_at, plan.attempts_remaining, plan.gives_up_at) == (None, 0, None)
    assert plan.paused


def test_last_error_is_only_a_refusal() -> None:
    assert (
        delivery_detail(record(last_reply_code=250, last_reply_text="ok"), POLICY, NOW).last_error
        is None
    )
    error = delivery_detail(record(last_reply_code=451, last_reply_text="later"), POLICY, NOW)
    assert error.last_error is not None and error.last_error.reply_code == 451
    render = delivery_detail(record(last_reply_text="no template"), POLICY, NOW)
    assert render.last_error is not None and render.last_error.reply_text == "no template"
    assert delivery_detail(record(), POLICY, NOW).priority == "normal"
