"""asyncpg records of the operator queries into ``operator_views`` values."""

from __future__ import annotations

import json
from collections.abc import Sequence

import asyncpg

from maildaemon.store.operator.filters import GLOBAL_SCOPE, priority_name
from maildaemon.store.operator.records import (
    Attempt,
    DeadLetter,
    DeadLetterItem,
    DeliveryRecord,
    DeliverySummary,
    LateOutcome,
    MalformedCommand,
    Pause,
    RecipientResult,
    Recipients,
    ReportEntry,
    SendingState,
)


def report_entry(r: asyncpg.Record) -> ReportEntry:
    lines = json.loads(r["recipients"]) if r["recipients"] else []
    return ReportEntry(
        report_id=r["report_id"],
        received_at=r["received_at"],
        via=r["via"],
        kind=r["kind"],
        match_status=r["match_status"],
        detail=r["detail"],
        recipients=[x for x in lines if isinstance(x, dict)],
    )


def late_outcome(r: asyncpg.Record) -> LateOutcome:
    return LateOutcome(**dict(r))


def delivery_record(
    r: asyncpg.Record,
    attempts: list[Attempt],
    dead: DeadLetter | None,
    reports: Sequence[asyncpg.Record] = (),
    late: Sequence[asyncpg.Record] = (),
) -> DeliveryRecord:
    pending = r["pending_rcpts"]
    return DeliveryRecord(
        delivery_id=r["delivery_id"],
        source=r["source"],
        idempotency_key=r["idempotency_key"],
        status=r["status"],
        status_reason=r["status_reason"],
        failure_code=r["failure_code"],
        priority=r["priority"],
        payload_mode=r["payload_mode"],
        template_id=r["template_id"],
        locale=r["locale"],
        recipients=Recipients(
            to=list(r["to_addrs"]),
            cc=list(r["cc_addrs"]),
            bcc=list(r["bcc_addrs"]),
            reply_to=r["reply_to"],
            pending=list(pending) if pending is not None else None,
            accepted_count=r["rcpts_accepted"],
        ),
        send_at=r["send_at"],
        expires_at=r["expires_at"],
        next_attempt_at=r["next_attempt_at"],
        attempt_count=r["attempt_count"],
        ladder_base=r["ladder_base"],
        possible_duplicate=r["possible_duplicate"],
        last_reply_code=r["last_reply_code"],
        last_reply_text=r["last_reply_text"],
        message_id=r["message_id"],
        rendered_at=r["rendered_at"],
        stream_entry_id=r["stream_entry_id"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        finished_at=r["finished_at"],
        paused=r["paused"],
        attempts=attempts,
        dead_letter=dead,
        reports=[report_entry(x) for x in reports],
        late_outcomes=[late_outcome(x) for x in late],
    )


def attempt(r: asyncpg.Record) -> Attempt:
    raw = json.loads(r["recipients"]) if r["recipients"] is not None else {}
    recipients = {
        addr: RecipientResult(str(o.get("outcome")), o.get("code"), o.get("text"))
        for addr, o in (raw.items() if isinstance(raw, dict) else ())
        if isinstance(o, dict)
    }
    return Attempt(
        attempt_no=r["attempt_no"],
        status=r["status"],
        started_at=r["started_at"],
        finished_at=r["finished_at"],
        reply_code=r["reply_code"],
        reply_text=r["reply_text"],
        recipients=recipients,
        worker=r["worker"],
    )


def summary(r: asyncpg.Record) -> DeliverySummary:
    return DeliverySummary(
        delivery_id=r["delivery_id"],
        status=r["status"],
        status_reason=r["status_reason"],
        source=r["source"],
        priority=priority_name(r["priority"]),
        template_id=r["template_id"],
        to=list(r["to_addrs"]),
        attempt_count=r["attempt_count"],
        last_reply_code=r["last_reply_code"],
        last_reply_text=r["last_reply_text"],
        next_attempt_at=r["next_attempt_at"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        finished_at=r["finished_at"],
    )


def dead_letter_item(r: asyncpg.Record) -> DeadLetterItem:
    values = dict(r)
    values["to"] = list(values.pop("to_addrs"))
    return DeadLetterItem(**values)


def malformed(r: asyncpg.Record) -> MalformedCommand:
    return MalformedCommand(**dict(r))


def sending_state(rows: Sequence[asyncpg.Record]) -> SendingState:
    pauses = [Pause(**dict(r)) for r in rows]
    return SendingState(
        paused_globally=any(p.scope == GLOBAL_SCOPE for p in pauses),
        paused_sources=[p.scope for p in pauses if p.scope != GLOBAL_SCOPE],
        pauses=pauses,
    )
