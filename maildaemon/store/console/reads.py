"""PostgreSQL reads behind the operator console: stats time series, pinned message bytes,
malformed records by delivery id. Read-only, like ``operator_reads``."""

from __future__ import annotations

import asyncpg

from maildaemon.store.console import statements as q
from maildaemon.store.console.records import (
    WINDOWS,
    PinnedMessage,
    SeriesPoint,
    SeriesTotals,
    StatsSeries,
    Window,
)
from maildaemon.store.operator import rows
from maildaemon.store.operator.records import MalformedCommand
from maildaemon.store.pipeline.db import translate_errors


class ConsoleReads:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def series(self, window: Window) -> StatsSeries:
        width, count = WINDOWS[window]
        async with translate_errors("stats series", self.pool):
            records = await self.pool.fetch(q.STATS_SERIES, width, count)
        points = [
            SeriesPoint(
                start=r["start"],
                sent=r["sent"],
                failed=r["failed"],
                dead_lettered=r["dead_lettered"],
                malformed=r["malformed"],
            )
            for r in records
        ]
        totals = SeriesTotals(
            sent=sum(p.sent for p in points),
            failed=sum(p.failed for p in points),
            dead_lettered=sum(p.dead_lettered for p in points),
            malformed=sum(p.malformed for p in points),
        )
        return StatsSeries(window, width, points, totals)

    async def pinned_message(self, delivery_id: str) -> PinnedMessage | None:
        async with translate_errors("message lookup", self.pool):
            row = await self.pool.fetchrow(q.RENDERED_MESSAGE, delivery_id)
        if row is None:
            return None
        data = row["rendered"]
        return PinnedMessage(
            delivery_id, row["status"], row["rendered_at"], bytes(data) if data else None
        )

    async def malformed_for_delivery(
        self, delivery_id: str, limit: int = 50
    ) -> list[MalformedCommand]:
        async with translate_errors("malformed lookup", self.pool):
            found = await self.pool.fetch(q.MALFORMED_BY_DELIVERY, delivery_id, limit)
        return [rows.malformed(r) for r in found]
