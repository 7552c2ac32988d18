"""What an attempt's outcome means for the delivery: the retry ladder and classification.

Pure functions: given the claim, what the server said (or how the link failed) and the
time, decide the attempt status, the delivery's next state and which recipients remain.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from maildaemon.delivery import (
    AttemptResult,
    AttemptStatus,
    ClaimedDelivery,
    DeliveryStatus,
    RecipientOutcome,
)
from maildaemon.errors import TransportError, TransportTimeout, UnknownOutcome
from maildaemon.retry import RetryPolicy
from maildaemon.sending.reply import Reply, SendReport

# Permanent refusals that say the address itself is bad: these go on the suppression list.
_BAD_MAILBOX_CODES = frozenset({550, 551, 553})
_ENHANCED = re.compile(r"^\s*5\.1\.\d+")


def is_bad_mailbox(reply: Reply) -> bool:
    return reply.code in _BAD_MAILBOX_CODES or bool(_ENHANCED.match(reply.text))


def _make(
    claim: ClaimedDelivery,
    started: datetime,
    finished: datetime,
    attempt_status: AttemptStatus,
    delivery_status: DeliveryStatus,
    **fields: Any,
) -> AttemptResult:
    fields.setdefault("possible_duplicate", claim.possible_duplicate)
    return AttemptResult(
        delivery_id=claim.delivery_id,
        source=claim.source,
        claim_token=claim.claim_token,
        attempt_no=claim.attempt_no,
        started_at=started,
        finished_at=finished,
        attempt_status=attempt_status,
        delivery_status=delivery_status,
        **fields,
    )


def _retry_or_give_up(
    claim: ClaimedDelivery,
    policy: RetryPolicy,
    status: AttemptStatus,
    reply: Reply | None,
    reason: str,
    started: datetime,
    finished: datetime,
    recipients: dict[str, RecipientOutcome],
    pending: tuple[str, ...] | None,
    possible_duplicate: bool = False,
) -> AttemptResult:
    """A transient failure: schedule the next rung of the ladder, or give up."""
    nxt = policy.next_attempt(claim.ladder_rung, finished)
    fields: dict[str, Any] = {
        "reply_code": reply.code if reply else None,
        "reply_text": reply.text if reply else reason,
        "recipients": recipients,
        "pending_rcpts": pending,
        "possible_duplicate": claim.possible_duplicate or possible_duplicate,
    }
    if nxt is not None and claim.expires_at is not None and nxt >= claim.expires_at:
        return _make(
            claim,
            started,
            finished,
            status,
            "expired",
            **fields,
            status_reason=f"expires before the next attempt; last: {reason}",
        )
    if nxt is None:
        return _make(
            claim,
            started,
            finished,
            status,
            "dead_letter",
            **fields,
            status_reason=f"retry ladder exhausted after {claim.ladder_rung} "
            f"attempts; last: {reason}",
        )
    return _make(
        claim,
        started,
        finished,
        status,
        "queued",
        **fields,
        next_attempt_at=nxt,
        status_reason=f"retry scheduled: {reason}",
    )


def from_report(
    claim: ClaimedDelivery,
    recipients: Sequence[str],
    report: SendReport,
    policy: RetryPolicy,
    started: datetime,
    finished: datetime,
    suppressed: dict[str, RecipientOutcome] | None = None,
) -> AttemptResult:
    """Classify a completed SMTP exchange, recipient by recipient."""
    outcomes: dict[str, RecipientOutcome] = dict(suppressed or {})
    for addr, rep in report.refused.items():
        outcomes[addr] = RecipientOutcome("refused", rep.code, rep.text)
    for addr, rep in report.deferred.items():
        outcomes[addr] = RecipientOutcome("deferred", rep.code, rep.text)
    suppress = tuple(addr for addr, rep in report.refused.items() if is_bad_mailbox(rep))
    data = report.data_reply
    if data is None:
        # Nobody got the message: MAIL or DATA refused, or no RCPT accepted.
        whole = report.data_refused
        if whole is not None and whole.code >= 500:
            for addr in report.accepted:
                outcomes[addr] = RecipientOutcome("refused", whole.code, whole.text)
            return _make(
                claim,
                started,
                finished,
                "provider_rejected",
                _final_status(claim, 0),
                reply_code=whole.code,
                reply_text=whole.text,
                recipients=outcomes,
                suppress=suppress,
                status_reason=f"permanently rejected: {whole.code} {whole.text}",
            )
        retry = tuple(a for a in recipients if a in report.deferred or a in report.accepted)
        if whole is None and not retry:
            first = next(iter(report.refused.values()), None)
            return _make(
                claim,
                started,
                finished,
                "provider_rejected",
                _final_status(claim, 0),
                reply_code=first.code if first else None,
                reply_text=first.text if first else None,
                recipients=outcomes,
                suppress=suppress,
                status_reason="every remaining recipient was refused",
            )
        reply = whole or next(iter(report.deferred.values()), None)
        reason = f"{reply.code} {reply.text}" if reply else "no recipient accepted"
        result = _retry_or_give_up(
            claim, policy, "transport_failed", reply, reason, started, finished, outcomes, retry
        )
        return replace(result, suppress=suppress)
    # DATA accepted: every accepted recipient has the message now.
    for addr in report.accepted:
        outcomes[addr] = RecipientOutcome("accepted", data.code, data.text)
    if not report.deferred:
        note = f"{len(report.refused)} recipient(s) refused" if report.refused else None
        return _make(
            claim,
            started,
            finished,
            "sent",
            "sent",
            reply_code=data.code,
            reply_text=data.text,
            recipients=outcomes,
            suppress=suppress,
            status_reason=note,
        )
    # Some recipients were deferred: retry only those, never the ones that accepted.
    first = next(iter(report.deferred.values()))
    pending = tuple(a for a in recipients if a in report.deferred)
    later = _retry_or_give_up(
        claim,
        policy,
        "sent",
        data,
        f"{len(pending)} recipient(s) deferred: {first.code} {first.text}",
        started,
        finished,
        outcomes,
        pending,
    )
    status: DeliveryStatus = "queued" if later.delivery_status == "queued" else "sent"
    return replace(
        later, delivery_status=status, reply_code=data.code, reply_text=data.text, suppress=suppress
    )


def _final_status(claim: ClaimedDelivery, accepted_now: int) -> DeliveryStatus:
    """Nothing is left to try: `sent` if anyone got the message, else `suppressed`."""
    return "sent" if claim.rcpts_accepted + accepted_now > 0 else "suppressed"


def from_error(
    claim: ClaimedDelivery,
    recipients: Sequence[str],
    exc: TransportError,
    policy: RetryPolicy,
    started: datetime,
    finished: datetime,
) -> AttemptResult:
    """Classify an exchange that failed at the connection level."""
    reason = str(exc)
    reply = Reply(exc.code, exc.text or reason) if exc.code is not None else None
    pending = tuple(recipients)
    if isinstance(exc, UnknownOutcome):
        if policy.unknown_policy == "hold":
            return _make(
                claim,
                started,
                finished,
                "unknown",
                "dead_letter",
                reply_text=reason,
                pending_rcpts=pending,
                possible_duplicate=True,
                status_reason="outcome unknown; held for operator review",
            )
        return _retry_or_give_up(
            claim,
            policy,
            "unknown",
            None,
            reason,
            started,
            finished,
            {},
            pending,
            possible_duplicate=True,
        )
    if exc.permanent:
        return _make(
            claim,
            started,
            finished,
            "provider_rejected",
            _final_status(claim, 0),
            reply_code=exc.code,
            reply_text=exc.text or reason,
            status_reason=f"permanently rejected: {reason}",
        )
    status: AttemptStatus = "timed_out" if isinstance(exc, TransportTimeout) else "transport_failed"
    return _retry_or_give_up(claim, policy, status, reply, reason, started, finished, {}, None)


def without_attempt(
    claim: ClaimedDelivery,
    status: DeliveryStatus,
    reason: str,
    now: datetime,
    attempt_status: AttemptStatus,
    *,
    record_attempt: bool = False,
    recipients: dict[str, RecipientOutcome] | None = None,
) -> AttemptResult:
    """End a delivery without talking to the server (expired, stub mode, suppressed, failed)."""
    return _make(
        claim,
        now,
        now,
        attempt_status,
        status,
        reply_text=reason if record_attempt else None,
        recipients=recipients or {},
        status_reason=reason,
        record_attempt=record_attempt,
    )
