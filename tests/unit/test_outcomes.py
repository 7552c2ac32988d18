"""Classification of SMTP outcomes and the retry ladder (pure logic)."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from maildaemon.delivery import ClaimedDelivery
from maildaemon.errors import (
    InsecureTransportError,
    MessageTooLarge,
    PermanentTransportError,
    TransientTransportError,
    TransportTimeout,
    UnknownOutcome,
)
from maildaemon.retry import RetryPolicy
from maildaemon.sending.outcomes import from_error, from_report, is_bad_mailbox
from maildaemon.sending.reply import Reply, SendReport

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy((30.0, 120.0, 600.0), 0.0)


def claim(
    rung: int = 1,
    *,
    expires_at: datetime | None = None,
    accepted: int = 0,
    to: tuple[str, ...] = ("a@example.com",),
) -> ClaimedDelivery:
    return ClaimedDelivery(
        delivery_id="d",
        source="notification",
        claim_token=3,
        attempt_no=rung,
        priority=2,
        to_addrs=to,
        cc_addrs=(),
        bcc_addrs=(),
        pending_rcpts=None,
        expires_at=expires_at,
        message_id="<m@x>",
        traceparent=None,
        possible_duplicate=False,
        rcpts_accepted=accepted,
        ladder_rung=rung,
        command=None,
        rendered=b"x",
    )


def ok() -> SendReport:
    return SendReport(accepted={"a@example.com": Reply(250, "OK")}, data_reply=Reply(250, "queued"))


def test_ladder_steps_then_gives_up() -> None:
    assert POLICY.next_attempt(1, NOW) == NOW + timedelta(seconds=30)
    assert POLICY.next_attempt(3, NOW) == NOW + timedelta(seconds=600)
    assert POLICY.next_attempt(4, NOW) is None


def test_jitter_stays_within_bounds() -> None:
    policy = RetryPolicy((100.0,), 0.1)
    rng = random.Random(7)
    for _ in range(200):
        nxt = policy.next_attempt(1, NOW, rng)
        assert nxt is not None
        assert timedelta(seconds=90) <= nxt - NOW <= timedelta(seconds=110)


def test_accepted_is_sent() -> None:
    result = from_report(claim(), ["a@example.com"], ok(), POLICY, NOW, NOW)
    assert (result.attempt_status, result.delivery_status) == ("sent", "sent")
    assert result.recipients["a@example.com"].outcome == "accepted"


def test_transient_rcpt_refusal_schedules_a_retry() -> None:
    report = SendReport(deferred={"a@example.com": Reply(451, "4.3.0 later")})
    result = from_report(claim(), ["a@example.com"], report, POLICY, NOW, NOW)
    assert result.attempt_status == "transport_failed"
    assert result.delivery_status == "queued"
    assert result.next_attempt_at == NOW + timedelta(seconds=30)
    assert result.pending_rcpts == ("a@example.com",)


def test_last_rung_dead_letters() -> None:
    report = SendReport(deferred={"a@example.com": Reply(451, "later")})
    result = from_report(claim(rung=4), ["a@example.com"], report, POLICY, NOW, NOW)
    assert result.delivery_status == "dead_letter" and result.dead_letter
    assert "exhausted" in (result.status_reason or "")


def test_retry_after_expiry_ends_expired() -> None:
    report = SendReport(deferred={"a@example.com": Reply(451, "later")})
    result = from_report(
        claim(expires_at=NOW + timedelta(seconds=10)), ["a@example.com"], report, POLICY, NOW, NOW
    )
    assert result.delivery_status == "expired"


def test_unknown_mailbox_is_suppressed_and_listed() -> None:
    report = SendReport(refused={"a@example.com": Reply(550, "5.1.1 unknown user")})
    result = from_report(claim(), ["a@example.com"], report, POLICY, NOW, NOW)
    assert (result.attempt_status, result.delivery_status) == ("provider_rejected", "suppressed")
    assert result.suppress == ("a@example.com",)


def test_policy_refusal_is_final_but_not_listed() -> None:
    report = SendReport(refused={"a@example.com": Reply(554, "5.7.1 policy")})
    result = from_report(claim(), ["a@example.com"], report, POLICY, NOW, NOW)
    assert result.delivery_status == "failed" and result.suppress == ()
    assert (result.reply_code, result.reply_text) == (554, "5.7.1 policy")


def test_spam_rejection_with_550_does_not_suppress() -> None:
    report = SendReport(refused={"a@example.com": Reply(550, "5.7.1 message rejected as spam")})
    result = from_report(claim(), ["a@example.com"], report, POLICY, NOW, NOW)
    assert (result.attempt_status, result.delivery_status) == ("provider_rejected", "failed")
    assert result.suppress == ()


def test_mixed_refusals_suppress_only_the_dead_mailbox() -> None:
    rcpts = ["a@example.com", "b@example.com"]
    report = SendReport(
        refused={
            "a@example.com": Reply(550, "5.1.1 no such user"),
            "b@example.com": Reply(550, "5.7.26 DMARC policy"),
        }
    )
    result = from_report(claim(to=tuple(rcpts)), rcpts, report, POLICY, NOW, NOW)
    assert result.delivery_status == "failed" and result.suppress == ("a@example.com",)


@pytest.mark.parametrize("code", [421, 451, 452])
def test_transient_refusal_of_mail_from_retries_every_recipient(code: int) -> None:
    rcpts = ["a@example.com", "b@example.com"]
    report = SendReport(data_refused=Reply(code, "4.3.0 try later"))
    result = from_report(claim(to=tuple(rcpts)), rcpts, report, POLICY, NOW, NOW)
    assert (result.attempt_status, result.delivery_status) == ("transport_failed", "queued")
    assert result.pending_rcpts == tuple(rcpts)
    assert (result.reply_code, result.reply_text) == (code, "4.3.0 try later")


def test_transient_data_refusal_keeps_deferred_and_accepted_but_not_refused() -> None:
    rcpts = ["a@example.com", "b@example.com", "c@example.com"]
    report = SendReport(
        accepted={"a@example.com": Reply(250, "OK")},
        deferred={"b@example.com": Reply(450, "busy")},
        refused={"c@example.com": Reply(550, "5.1.1 no")},
        data_refused=Reply(451, "4.3.0 local error"),
    )
    result = from_report(claim(to=tuple(rcpts)), rcpts, report, POLICY, NOW, NOW)
    assert result.delivery_status == "queued"
    assert result.pending_rcpts == ("a@example.com", "b@example.com")
    assert result.suppress == ("c@example.com",)


def test_empty_pending_list_from_an_older_release_means_everyone() -> None:
    stuck = replace(claim(to=("a@example.com", "b@example.com")), pending_rcpts=())
    assert stuck.envelope_recipients() == ("a@example.com", "b@example.com")
    served = replace(stuck, rcpts_accepted=1)
    assert served.envelope_recipients() == ()


def test_partial_acceptance_retries_only_the_deferred() -> None:
    rcpts = ["a@example.com", "b@example.com", "c@example.com"]
    report = SendReport(
        accepted={"a@example.com": Reply(250, "OK")},
        deferred={"b@example.com": Reply(450, "busy")},
        refused={"c@example.com": Reply(550, "5.1.1 no")},
        data_reply=Reply(250, "queued"),
    )
    result = from_report(claim(to=tuple(rcpts)), rcpts, report, POLICY, NOW, NOW)
    assert result.attempt_status == "sent"
    assert result.delivery_status == "queued"
    assert result.pending_rcpts == ("b@example.com",)
    assert result.suppress == ("c@example.com",)


def test_partial_acceptance_with_ladder_exhausted_is_sent() -> None:
    rcpts = ["a@example.com", "b@example.com"]
    report = SendReport(
        accepted={"a@example.com": Reply(250, "OK")},
        deferred={"b@example.com": Reply(450, "busy")},
        data_reply=Reply(250, "queued"),
    )
    result = from_report(claim(rung=4, to=tuple(rcpts)), rcpts, report, POLICY, NOW, NOW)
    assert result.delivery_status == "sent"


def test_later_refusal_after_earlier_acceptance_is_sent() -> None:
    report = SendReport(refused={"b@example.com": Reply(550, "5.1.1 no")})
    result = from_report(claim(accepted=1), ["b@example.com"], report, POLICY, NOW, NOW)
    assert result.delivery_status == "sent"


def test_data_permanent_rejection() -> None:
    report = SendReport(
        accepted={"a@example.com": Reply(250, "OK")},
        data_refused=Reply(554, "5.6.0 content rejected"),
    )
    result = from_report(claim(), ["a@example.com"], report, POLICY, NOW, NOW)
    assert (result.attempt_status, result.delivery_status) == ("provider_rejected", "failed")
    assert result.reply_code == 554


def test_data_transient_rejection_retries() -> None:
    report = SendReport(
        accepted={"a@example.com": Reply(250, "OK")}, data_refused=Reply(452, "4.3.1 no space")
    )
    result = from_report(claim(), ["a@example.com"], report, POLICY, NOW, NOW)
    assert (result.attempt_status, result.delivery_status) == ("transport_failed", "queued")


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (TransportTimeout("slow"), "timed_out"),
        (InsecureTransportError("no STARTTLS"), "transport_failed"),
        (TransientTransportError("refused", code=421, text="busy"), "transport_failed"),
    ],
)
def test_connection_level_failures_retry(exc: TransientTransportError, status: str) -> None:
    result = from_error(claim(), ["a@example.com"], exc, POLICY, NOW, NOW)
    assert result.attempt_status == status and result.delivery_status == "queued"
    assert result.reply_text


def test_permanent_connection_failure() -> None:
    exc = PermanentTransportError("no", code=554, text="go away")
    result = from_error(claim(), ["a@example.com"], exc, POLICY, NOW, NOW)
    assert result.delivery_status == "failed" and result.reply_code == 554
    assert result.recipients["a@example.com"].outcome == "refused"


def test_message_too_large_fails_for_good_naming_both_sizes() -> None:
    exc = MessageTooLarge(2_000_000, 1_000_000)
    result = from_error(claim(), ["a@example.com"], exc, POLICY, NOW, NOW)
    assert (result.attempt_status, result.delivery_status) == ("failed", "failed")
    assert result.next_attempt_at is None and result.reply_code is None
    reason = result.status_reason or ""
    assert reason.startswith("message_too_large:") and "2000000" in reason
    assert "1000000" in reason and result.reply_text == reason
    assert result.recipients["a@example.com"].outcome == "refused"


def test_unknown_outcome_retries_as_possible_duplicate() -> None:
    result = from_error(claim(), ["a@example.com"], UnknownOutcome("lost"), POLICY, NOW, NOW)
    assert result.attempt_status == "unknown" and result.delivery_status == "queued"
    assert result.possible_duplicate


def test_unknown_outcome_can_be_held() -> None:
    hold = RetryPolicy(POLICY.ladder, 0.0, "hold")
    result = from_error(claim(), ["a@example.com"], UnknownOutcome("lost"), hold, NOW, NOW)
    assert result.delivery_status == "dead_letter" and result.possible_duplicate


@pytest.mark.parametrize(
    ("code", "text", "bad"),
    [
        (550, "5.1.1 user unknown", True),
        (550, "5.1.10 recipient address has null MX", True),
        (550, "5.2.1 mailbox disabled", True),
        (554, "5.1.2 bad destination", True),
        (553, "5.1.3 bad address syntax", True),
        (550, "5.1.8 bad sender's system address", False),
        (553, "mailbox name invalid", False),
        (550, "no such user", False),
        (551, "user not local", False),
        (552, "5.3.4 too big", False),
        (554, "5.7.1 spam", False),
        (550, "5.7.1 message rejected as spam", False),
        (550, "5.7.26 unauthenticated mail is prohibited (DMARC)", False),
        (550, "5.2.2 mailbox full", False),
        (554, "5.4.4 unable to route", False),
        (550, "4.1.1 odd mix", False),
        (450, "4.1.1 try later", False),
    ],
)
def test_bad_mailbox_detection(code: int, text: str, bad: bool) -> None:
    assert is_bad_mailbox(Reply(code, text)) is bad
