"""Late outcomes: what a report says happened after the relay's 250, written inside the one
terminal-outcome writer's call (``db.write_outcomes(..., late=...)``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from maildaemon.addresses import lookup_key
from maildaemon.delivery import LateOutcome
from maildaemon.store.pipeline import rows as convert
from maildaemon.store.pipeline import statements as q

Connection = asyncpg.Connection | PoolConnectionProxy


async def write_late(
    conn: Connection, late: Sequence[LateOutcome], report_id: int, suppression_ttl: float
) -> set[str]:
    """Late outcomes: new ones only (a repeated report changes nothing twice), a delivery
    ``sent -> bounced`` once every recipient bounced, suppressions, an event per effect."""
    rows = json.dumps([convert.late_row(o) for o in late], ensure_ascii=False)
    new = {
        (r["delivery_id"], r["address"], r["outcome"])
        for r in await conn.fetch(q.RECORD_LATE_OUTCOMES, rows, report_id)
    }
    fresh = [o for o in late if (o.delivery_id, o.address, o.outcome) in new]
    bounced = sorted({o.delivery_id for o in fresh if o.outcome == "bounced"})
    if bounced:
        await conn.execute(q.BOUNCE_DELIVERIES, bounced, "every recipient bounced after delivery")
    suppress = {o.address: o for o in fresh if o.suppress and o.address}
    if suppress:
        await conn.execute(
            q.SUPPRESS_ADDRESSES,
            [lookup_key(a).lower() for a in suppress],
            [convert.late_reason(o) for o in suppress.values()],
            [o.reply_code for o in suppress.values()],
            [o.delivery_id for o in suppress.values()],
            suppression_ttl,
        )
    if fresh:
        at = datetime.now(UTC)
        events = [convert.late_event(o, report_id, at) for o in fresh]
        await conn.execute(q.LATE_EVENTS, json.dumps(events, ensure_ascii=False))
    return {o.delivery_id for o in fresh}
