"""The delivery pipeline's rows: domain values to query parameters and records back."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import asyncpg

from maildaemon.contract.command import DeliveryCommand, Rejection
from maildaemon.delivery import (
    TERMINAL_STATUSES,
    AttemptResult,
    ClaimedDelivery,
    IntakeEntry,
    LateOutcome,
)


def clean_text(value: str | None) -> str | None:
    """Text PostgreSQL accepts: no NUL, no unpaired surrogates (escaped instead)."""
    if value is None:
        return None
    return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def iso(value: datetime | None) -> str | None:
    """An instant as PostgreSQL reads it: in UTC (PostgreSQL refuses offsets past ±15:59,
    which RFC 3339 and Python allow up to ±23:59)."""
    return value.astimezone(UTC).isoformat() if value is not None else None


def conflict(entry: IntakeEntry, holder: str | None, same_key: bool) -> Rejection:
    cmd = entry.command
    assert cmd is not None
    if same_key:
        return Rejection(
            "idempotency_conflict",
            f"idempotency_key {cmd.idempotency_key!r} of source {cmd.source!r} is reserved by "
            f"delivery {holder!r} for a different command",
            cmd.delivery_id,
            cmd.source,
        )
    return Rejection(
        "delivery_id_conflict",
        f"delivery_id {cmd.delivery_id!r} already belongs to a different command",
        cmd.delivery_id,
        cmd.source,
    )


def unprocessable(entry: IntakeEntry, exc: BaseException) -> Rejection:
    """The record of a command that failed while being taken in (not its validation)."""
    cmd = entry.command
    return Rejection(
        "intake_error",
        f"the command could not be taken in: {type(exc).__name__}: {exc}"[:500],
        cmd.delivery_id if cmd else None,
        cmd.source if cmd else None,
    )


def delivery_row(entry: IntakeEntry, fingerprint: bytes) -> dict[str, Any]:
    cmd = entry.command
    assert cmd is not None
    return {
        "delivery_id": cmd.delivery_id,
        "source": cmd.source,
        "idempotency_key": cmd.idempotency_key,
        "command_hash": fingerprint.hex(),
        "priority": cmd.priority_rank,
        "payload_mode": cmd.payload_mode,
        "template_id": cmd.template_id,
        "locale": cmd.locale,
        "to_addrs": [r.address for r in cmd.to],
        "cc_addrs": [r.address for r in cmd.cc],
        "bcc_addrs": [r.address for r in cmd.bcc],
        "reply_to": cmd.reply_to.address if cmd.reply_to else None,
        "send_at": iso(cmd.send_at),
        "expires_at": iso(cmd.expires_at),
        "stream_entry_id": entry.stream_entry_id,
        "traceparent": cmd.traceparent,
        "command": stored_command(cmd),
    }


def stored_command(cmd: DeliveryCommand) -> dict[str, Any]:
    """The command as the payload row keeps it: custom headers as name/value pairs, so
    that jsonb (which orders object keys its own way) keeps the producer's order."""
    data = cmd.model_dump(mode="json", exclude_defaults=True)
    if "headers" in data:
        data["headers"] = [[name, value] for name, value in cmd.headers.items()]
    return data


def result_row(r: AttemptResult, worker: str) -> dict[str, Any]:
    return {
        "delivery_id": r.delivery_id,
        "claim_token": r.claim_token,
        "attempt_no": r.attempt_no,
        "attempt_status": r.attempt_status,
        "delivery_status": r.delivery_status,
        "started_at": r.started_at.isoformat(),
        "finished_at": r.finished_at.isoformat(),
        "reply_code": r.reply_code,
        "reply_text": clean_text(r.reply_text),
        "recipients": {
            addr: {"outcome": o.outcome, "code": o.code, "text": clean_text(o.text)}
            for addr, o in r.recipients.items()
        }
        or None,
        "next_attempt_at": iso(r.next_attempt_at),
        "pending_rcpts": list(r.pending_rcpts) if r.pending_rcpts is not None else None,
        "keep_pending": r.pending_rcpts is None and r.delivery_status not in TERMINAL_STATUSES,
        "status_reason": clean_text(r.status_reason),
        "failure_code": r.failure_code,
        "terminal": r.delivery_status in TERMINAL_STATUSES,
        "possible_duplicate": r.possible_duplicate,
        "record_attempt": r.record_attempt,
        "claimed": r.claimed,
        "accepted_now": sum(1 for o in r.recipients.values() if o.outcome == "accepted"),
        "worker": worker,
        "event": event_fields(r),
    }


def event_fields(r: AttemptResult) -> dict[str, str | int]:
    """The outcome event published on MAIL_EVENT_STREAM for a recorded result."""
    return {
        "delivery_id": r.delivery_id,
        "source": r.source,
        "status": "retry_scheduled" if r.delivery_status == "queued" else r.delivery_status,
        "attempt": r.attempt_count,  # attempts on record (0: ended before any attempt)
        "attempt_status": r.attempt_status,
        "reply_code": r.reply_code if r.reply_code is not None else "",
        "reply_text": clean_text((r.reply_text or "")[:500]) or "",
        "next_attempt_at": r.next_attempt_at.isoformat() if r.next_attempt_at else "",
        "at": r.finished_at.isoformat(),
        "failure_code": r.failure_code or "",
    }


def late_row(o: LateOutcome) -> dict[str, Any]:
    return {
        "delivery_id": o.delivery_id,
        "address": o.address,
        "outcome": o.outcome,
        "status_code": clean_text(o.status_code),
        "diagnostic": clean_text(o.diagnostic),
    }


def late_event(o: LateOutcome, report_id: int, at: datetime) -> dict[str, Any]:
    """The outcome event of a late outcome (``delivery_status`` is added by the statement)."""
    return {
        "delivery_id": o.delivery_id,
        "event": {
            "delivery_id": o.delivery_id,
            "source": o.source,
            "status": o.outcome,
            "recipient": o.address,
            "status_code": o.status_code or "",
            "reply_code": o.reply_code if o.reply_code is not None else "",
            "reply_text": clean_text((o.diagnostic or "")[:500]) or "",
            "report_id": report_id,
            "at": at.isoformat(),
        },
    }


def late_reason(o: LateOutcome) -> str:
    if o.outcome == "complained":
        return "complaint: the recipient reported the message (feedback report)"
    text = f"bounced after delivery: {o.status_code or ''} {o.diagnostic or ''}".strip()
    return clean_text(text[:500]) or ""


def suppression_reason(address: str, r: AttemptResult) -> str:
    outcome = r.recipients.get(address)
    if outcome is not None and outcome.text:
        text = f"permanent rejection: {outcome.code} {outcome.text}"[:500]
    else:
        text = f"permanent rejection: {r.reply_code} {r.reply_text}"[:500]
    return clean_text(text) or ""


def rcpt_code(address: str, r: AttemptResult) -> int | None:
    outcome = r.recipients.get(address)
    return outcome.code if outcome is not None else r.reply_code


def claimed_or_unreadable(r: asyncpg.Record) -> ClaimedDelivery:
    """The claim as the scheduler takes it; a row whose values cannot be read back (a
    payload that is no JSON object, an array that is no list of text) becomes a claim
    marked ``unreadable``, which the scheduler ends instead of dying on it."""
    try:
        return claimed(r)
    except Exception as exc:
        return ClaimedDelivery(
            delivery_id=r["delivery_id"],
            source=r["source"],
            claim_token=r["claim_token"],
            attempt_no=r["attempt_count"],
            priority=r["priority"],
            to_addrs=(),
            cc_addrs=(),
            bcc_addrs=(),
            pending_rcpts=None,
            expires_at=None,
            message_id=None,
            traceparent=None,
            possible_duplicate=False,
            rcpts_accepted=0,
            ladder_rung=0,
            command=None,
            rendered=None,
            unreadable=clean_text(f"{type(exc).__name__}: {exc}"[:300]),
        )


def claimed(r: asyncpg.Record) -> ClaimedDelivery:
    command = r["command"]
    rendered = r["rendered"]
    pending = r["pending_rcpts"]
    return ClaimedDelivery(
        delivery_id=r["delivery_id"],
        source=r["source"],
        claim_token=r["claim_token"],
        attempt_no=r["attempt_count"],
        priority=r["priority"],
        to_addrs=tuple(r["to_addrs"]),
        cc_addrs=tuple(r["cc_addrs"]),
        bcc_addrs=tuple(r["bcc_addrs"]),
        pending_rcpts=tuple(pending) if pending is not None else None,
        expires_at=r["expires_at"],
        message_id=r["message_id"],
        traceparent=r["traceparent"],
        possible_duplicate=r["possible_duplicate"],
        rcpts_accepted=r["rcpts_accepted"],
        ladder_rung=r["ladder_rung"],
        command=_command(command),
        rendered=bytes(rendered) if rendered is not None else None,
        stream_entry_id=r["stream_entry_id"],
    )


def _command(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"the stored command is a JSON {type(value).__name__}, not an object")
    return value


def stream_fields(text: str) -> dict[str, str | int | float]:
    """An outbox row as the event stream's entry fields: never raises, so one row can
    not stop publishing. Values Redis cannot take as they are (nested, booleans, null)
    go as JSON text; a row that is no JSON object goes whole as ``malformed_event``."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not value:
        return {"malformed_event": clean_text(str(text)[:2000]) or ""}
    out: dict[str, str | int | float] = {}
    for key, item in value.items():
        name = clean_text(str(key)) or "_"
        if isinstance(item, str):
            out[name] = clean_text(item) or ""
        elif isinstance(item, int | float) and not isinstance(item, bool):
            out[name] = item
        else:
            out[name] = clean_text(json.dumps(item, ensure_ascii=False)) or ""
    return out
