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
from maildaemon.errors import MessageTooLarge, TransportError, TransportTimeout, UnknownOutcome
from maildaemon.retry import RetryPolicy
from maildaemon.sending.reply import Reply, SendReport

# RFC 3463 enhanced status code at the start of the reply text: class.subject.detail.
_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})(?!\d)")
# X.1.7 and X.1.8 are about the *sender's* address: they say nothing about the recipient.
_SENDER_ADDRESS_DETAILS = frozenset({7, 8})


def enhanced_code(reply: Reply) -> tuple[int, int, int] | None:
    """The RFC 3463 enhanced status code the reply text starts with, if any."""
    match = _ENHANCED.match(reply.text)
    if match is None:
        return None
    klass, subject, detail = (int(g) for g in match.groups())
    return klass, subject, detail


def is_bad_mailbox(reply: Reply) -> bool:
    """A permanent failure that says the recipient's mailbox is dead: suppress the address.

    Only mailbox-level codes count (RFC 3463): 5.1.x address codes (bad mailbox, bad
    destination system, bad syntax, moved, null MX, ...; not 5.1.7/5.1.8, which are about
    the sender) and 5.2.1 (mailbox disabled). Policy and content refusals (5.7.x: spam,
    DMARC, blocked sender), system and network codes, and a 5xx without an enhanced code
    fail the delivery for that recipient without listing the address.
    """
    if reply.code < 500:
        return False
    code = enhanced_code(reply)
    if code is None or code[0] != 5:
        return False
    _, subject, detail = code
    if subject == 1:
        return detail not in _SENDER_ADDRESS_DETAILS
    return (subject, detail) == (2, 1)


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
        return claim.result(
            started,
            finished,
            status,
            "expired",
            **fields,
            status_reason=f"expires before the next attempt; last: {reason}",
        )
    if nxt is None:
        return claim.result(
            started,
            finished,
            status,
            "dead_letter",
            **fields,
            status_reason=f"retry ladder exhausted after {claim.ladder_rung} "
            f"attempts; last: {reason}",
        )
    return claim.result(
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
    if report.data_reply is None:
        return _nobody_got_it(
            claim, recipients, report, policy, started, finished, outcomes, suppress
        )
    # DATA accepted: every accepted recipient has the message now.
    data = report.data_reply
    for addr in report.accepted:
        outcomes[addr] = RecipientOutcome("accepted", data.code, data.text)
    if not report.deferred:
        note = f"{len(report.refused)} recipient(s) refused" if report.refused else None
        return claim.result(
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


def _nobody_got_it(
    claim: ClaimedDelivery,
    recipients: Sequence[str],
    report: SendReport,
    policy: RetryPolicy,
    started: datetime,
    finished: datetime,
    outcomes: dict[str, RecipientOutcome],
    suppress: tuple[str, ...],
) -> AttemptResult:
    """No message data was accepted: MAIL FROM or DATA refused, or no RCPT accepted.

    Every recipient the server did not refuse for good is still owed the message: a 4xx
    to MAIL FROM (no RCPT was even sent) or to DATA retries all of them.
    """
    whole = report.data_refused
    if whole is not None and whole.code >= 500:
        for addr in recipients:
            if addr not in report.refused:
                outcomes[addr] = RecipientOutcome("refused", whole.code, whole.text)
        return claim.result(
            started,
            finished,
            "provider_rejected",
            _final_status(claim, suppressed_all=False),
            reply_code=whole.code,
            reply_text=whole.text,
            recipients=outcomes,
            suppress=suppress,
            status_reason=f"permanently rejected: {whole.code} {whole.text}",
        )
    retry = tuple(a for a in recipients if a not in report.refused)
    if not retry:
        first = next(iter(report.refused.values()), None)
        listed = bool(suppress) and set(suppress) == set(report.refused)
        reason = "every remaining recipient was refused"
        if first is not None:
            reason += f": {first.code} {first.text}"
        return claim.result(
            started,
            finished,
            "provider_rejected",
            _final_status(claim, suppressed_all=listed),
            reply_code=first.code if first else None,
            reply_text=first.text if first else reason,
            recipients=outcomes,
            suppress=suppress,
            status_reason=reason,
        )
    reply = whole or next(iter(report.deferred.values()), None)
    reason = f"{reply.code} {reply.text}" if reply else "no recipient accepted"
    result = _retry_or_give_up(
        claim, policy, "transport_failed", reply, reason, started, finished, outcomes, retry
    )
    return replace(result, suppress=suppress)


def _final_status(claim: ClaimedDelivery, *, suppressed_all: bool) -> DeliveryStatus:
    """Nothing is left to try: `sent` if anyone got the message; `suppressed` when every
    refused recipient went on the suppression list (dead mailboxes); else `failed`."""
    if claim.rcpts_accepted > 0:
        return "sent"
    return "suppressed" if suppressed_all else "failed"


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
            return claim.result(
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
    if isinstance(exc, MessageTooLarge):
        return _too_large(claim, pending, reason, started, finished)
    if exc.permanent:
        return claim.result(
            started,
            finished,
            "provider_rejected",
            _final_status(claim, suppressed_all=False),
            reply_code=exc.code,
            reply_text=exc.text or reason,
            recipients={
                a: RecipientOutcome("refused", exc.code, exc.text or reason) for a in pending
            },
            status_reason=f"permanently rejected: {reason}",
        )
    status: AttemptStatus = "timed_out" if isinstance(exc, TransportTimeout) else "transport_failed"
    return _retry_or_give_up(claim, policy, status, reply, reason, started, finished, {}, None)


def _too_large(
    claim: ClaimedDelivery,
    pending: tuple[str, ...],
    reason: str,
    started: datetime,
    finished: datetime,
) -> AttemptResult:
    """Refused here, before MAIL FROM: nobody got it, and no later attempt would differ."""
    result = claim.result(
        started,
        finished,
        "failed",
        _final_status(claim, suppressed_all=False),
        reply_text=reason,
        recipients={a: RecipientOutcome("refused", None, reason) for a in pending},
        status_reason=reason,
    )
    return replace(result, failure_code=MessageTooLarge.failure_code)
