"""The endings a delivery meets before anything is sent: classified here, written by the
one terminal-outcome writer (``store/pipeline/db.write_outcomes``) like every other.

Each returns the ``AttemptResult`` the scheduler hands to the result writer. Whether an
attempt row is recorded says whether the daemon tried something for this claim (a render
or a read that failed) or only decided (expired, suppressed, stub mode).
"""

from __future__ import annotations

from datetime import datetime

from maildaemon.delivery import (
    DAEMON_FAILURE_CODES,
    AttemptResult,
    AttemptStatus,
    ClaimedDelivery,
    DeliveryStatus,
    RecipientOutcome,
)

_REASON_LIMIT = 500


def _ended(
    claim: ClaimedDelivery,
    status: DeliveryStatus,
    attempt_status: AttemptStatus,
    reason: str,
    now: datetime,
    *,
    tried: bool,
    recipients: dict[str, RecipientOutcome] | None = None,
    failure_code: str | None = None,
) -> AttemptResult:
    reason = reason[:_REASON_LIMIT]
    return claim.result(
        now,
        now,
        attempt_status,
        status,
        reply_text=reason if tried else None,
        recipients=recipients or {},
        status_reason=reason,
        record_attempt=tried,
        failure_code=failure_code,
    )


def expired(claim: ClaimedDelivery, now: datetime) -> AttemptResult:
    """``expires_at`` passed while the delivery waited: nothing is sent."""
    return _ended(
        claim, "expired", "expired", "expires_at passed before the attempt", now, tried=False
    )


def without_payload(claim: ClaimedDelivery, now: datetime) -> AttemptResult:
    """Neither pinned bytes nor a stored command: nothing to render or send from."""
    reason = "the delivery has no stored payload"
    return _ended(claim, "failed", "failed", reason, now, tried=True)


def render_failed(claim: ClaimedDelivery, reason: str, now: datetime) -> AttemptResult:
    """The message could not be built (a template error, a builder or DKIM fault)."""
    return _ended(claim, "failed", "failed", reason, now, tried=True)


def unprocessable(claim: ClaimedDelivery, code: str, error: str, now: datetime) -> AttemptResult:
    """The delivery's own data broke the daemon (``code`` is one of DAEMON_FAILURE_CODES):
    it ends alone instead of crash-looping the component."""
    reason = f"{DAEMON_FAILURE_CODES[code]}: {error}"
    return _ended(claim, "failed", "failed", reason, now, tried=True, failure_code=code)


def all_suppressed(
    claim: ClaimedDelivery, suppressed: dict[str, RecipientOutcome], now: datetime
) -> AttemptResult:
    """Every recipient still to send to is on the suppression list. A delivery that some
    recipient already accepted on an earlier attempt stays ``sent``."""
    status: DeliveryStatus = "sent" if claim.rcpts_accepted else "suppressed"
    reason = "every remaining recipient is on the suppression list"
    return _ended(claim, status, "suppressed", reason, now, tried=False, recipients=suppressed)


def stub_mode(claim: ClaimedDelivery, now: datetime) -> AttemptResult:
    """MAIL_SMTP_MODE=stub: rendered and recorded, never sent."""
    reason = "stub mode (MAIL_SMTP_MODE=stub): rendered, not sent"
    return _ended(claim, "suppressed", "suppressed", reason, now, tried=False)
