"""The reports' PostgreSQL access: a report and its effects in one transaction, the
delivery a token names, and the operator's reads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import asyncpg

from maildaemon.delivery import LateOutcome
from maildaemon.reports.model import Incoming, Matched, ParsedReport, ReportRecord, Target
from maildaemon.store.pgerrors import translate_errors
from maildaemon.store.pipeline.db import write_outcomes
from maildaemon.store.pipeline.rows import clean_text
from maildaemon.store.reports import statements as q
from maildaemon.store.reports.records import Rate, Rates, StoredLateOutcome, StoredReport

TEXT_MAX = 500


def _cut(value: str | None, limit: int = TEXT_MAX) -> str | None:
    return clean_text(value[:limit]) if value is not None else None


class ReportStore:
    """Reports on the daemon's (or the CLI's) pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def target(self, ref: bytes) -> Target | None:
        """The delivery a (valid) token's reference names, if it still exists."""
        async with translate_errors("report target", self.pool):
            row = await self.pool.fetchrow(q.TARGET, ref)
        if row is None:
            return None
        return Target(row["delivery_id"], row["source"], row["status"], tuple(row["recipients"]))

    async def record(
        self,
        incoming: Incoming,
        parsed: ParsedReport,
        matched: Matched,
        late: Sequence[LateOutcome],
        lines: Sequence[dict[str, Any]],
        suppression_ttl: float,
    ) -> ReportRecord:
        """The raw report, what it was matched to and its effects, in one transaction. The
        same bytes again are not recorded again and change nothing (``duplicate``)."""
        delivery_id = matched.target.delivery_id if matched.target else None
        remote = next((r.remote_mta for r in parsed.recipients if r.remote_mta), None)
        clean_lines = [
            {k: _cut(v) if isinstance(v, str) else v for k, v in x.items()} for x in lines
        ]
        async with (
            translate_errors("record report", self.pool),
            self.pool.acquire() as conn,
            conn.transaction(),
        ):
            report_id = await conn.fetchval(
                q.INSERT,
                incoming.via,
                _cut(incoming.envelope_from),
                _cut(", ".join(incoming.envelope_to)) or None,
                incoming.raw,
                incoming.size or len(incoming.raw),
                incoming.truncated,
                parsed.kind,
                matched.status,
                delivery_id,
                _cut(matched.detail),
                _cut(parsed.subject),
                _cut(remote),
                json.dumps(clean_lines, ensure_ascii=False),
            )
            if report_id is None:
                row = await conn.fetchrow(q.EXISTING, incoming.raw)
                assert row is not None
                return ReportRecord(
                    row["report_id"],
                    row["kind"],
                    row["match_status"],
                    row["delivery_id"],
                    row["detail"],
                    duplicate=True,
                )
            touched: set[str] = set()
            if late:
                touched = await write_outcomes(
                    conn, (), "reports", suppression_ttl, late=late, report_id=report_id
                )
        effects = tuple(f"{o.outcome} {o.address}" for o in late if o.delivery_id in touched)
        return ReportRecord(
            report_id, parsed.kind, matched.status, delivery_id, matched.detail, effects=effects
        )

    async def recent(
        self,
        limit: int,
        before: int | None = None,
        match_status: str | None = None,
        kind: str | None = None,
    ) -> list[StoredReport]:
        async with translate_errors("recent reports", self.pool):
            rows = await self.pool.fetch(q.RECENT, limit, before, match_status, kind)
        return [StoredReport.of(r) for r in rows]

    async def for_delivery(self, delivery_id: str, limit: int = 100) -> list[StoredReport]:
        async with translate_errors("delivery reports", self.pool):
            rows = await self.pool.fetch(q.FOR_DELIVERY, delivery_id, limit)
        return [StoredReport.of(r) for r in rows]

    async def late_outcomes(self, delivery_id: str) -> list[StoredLateOutcome]:
        async with translate_errors("late outcomes", self.pool):
            rows = await self.pool.fetch(q.LATE_OUTCOMES, delivery_id)
        return [
            StoredLateOutcome(
                r["address"],
                r["outcome"],
                r["status_code"],
                r["diagnostic"],
                r["report_id"],
                r["at"],
            )
            for r in rows
        ]

    async def raw(self, report_id: int) -> bytes | None:
        async with translate_errors("report raw", self.pool):
            value = await self.pool.fetchval(q.RAW, report_id)
        return bytes(value) if value is not None else None

    async def rates(self, hours: int) -> Rates:
        """Bounce and complaint rates over the last ``hours``, per source and domain."""
        async with translate_errors("report rates", self.pool):
            by_source = await self.pool.fetch(q.RATES_BY_SOURCE, hours)
            by_domain = await self.pool.fetch(q.RATES_BY_DOMAIN, hours)
        return Rates(hours, [_rate(r) for r in by_source], [_rate(r) for r in by_domain])


def _rate(r: asyncpg.Record) -> Rate:
    sent, bounced, complained = int(r["sent"]), int(r["bounced"]), int(r["complained"])
    return Rate(
        r["key"] or "",
        sent,
        bounced,
        complained,
        round(bounced / sent, 4) if sent else None,
        round(complained / sent, 4) if sent else None,
    )
