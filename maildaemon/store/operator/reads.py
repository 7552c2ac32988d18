"""PostgreSQL reads for the operator surface: lookups, listings with keyset pages, figures."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from maildaemon.store.operator import rows as views
from maildaemon.store.operator import statements as q
from maildaemon.store.operator.filters import (
    ATTEMPT_STATUSES,
    DELIVERY_STATUSES,
    ActionFilter,
    DeadLetterFilter,
    DeliveryFilter,
    MalformedFilter,
    PageRequest,
    SuppressionFilter,
    encode_cursor,
)
from maildaemon.store.operator.records import (
    Backlog,
    CommandTrace,
    DeadLetter,
    DeadLetterCounts,
    DeadLetterPage,
    DeliveryPage,
    DeliveryRecord,
    MalformedCommand,
    MalformedPage,
    OperatorAction,
    OperatorActionPage,
    SendingState,
    Stats,
    Suppression,
    SuppressionPage,
)
from maildaemon.store.pipeline.db import translate_errors

T = TypeVar("T")


class OperatorReads:
    """What an operator looks at; no writes."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def delivery(self, delivery_id: str) -> DeliveryRecord | None:
        async with (
            translate_errors("delivery lookup", self.pool),
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            row = await conn.fetchrow(q.DELIVERY, delivery_id)
            if row is None:
                return None
            attempts = await conn.fetch(q.ATTEMPTS, delivery_id)
            dead = await conn.fetchrow(q.DEAD_LETTER, delivery_id)
            reports = await conn.fetch(q.DELIVERY_REPORTS, delivery_id)
            late = await conn.fetch(q.DELIVERY_LATE_OUTCOMES, delivery_id)
        return views.delivery_record(
            row,
            [views.attempt(a) for a in attempts],
            DeadLetter(**dict(dead)) if dead is not None else None,
            reports,
            late,
        )

    async def deliveries(self, flt: DeliveryFilter, page: PageRequest) -> DeliveryPage:
        after = page.after or (None, None)
        async with translate_errors("delivery listing", self.pool):
            statement = (
                q.LIST_DELIVERIES if flt.recipient is None else q.LIST_DELIVERIES_BY_RECIPIENT
            )
            rows = await self.pool.fetch(
                statement,
                flt.status,
                flt.source,
                flt.recipient,
                flt.created_after,
                flt.created_before,
                after[0],
                after[1],
                page.limit + 1,
            )
        items, cursor = _page(
            rows,
            page.limit,
            views.summary,
            lambda r: encode_cursor("d", r["created_at"], r["delivery_id"]),
        )
        return DeliveryPage(items, cursor)

    async def dead_letters(self, flt: DeadLetterFilter, page: PageRequest) -> DeadLetterPage:
        after = page.after or (None, None, None)
        async with translate_errors("dead-letter listing", self.pool):
            rows = await self.pool.fetch(q.LIST_DEAD_LETTERS, *dl_args(flt), *after, page.limit + 1)
        items, cursor = _page(
            rows,
            page.limit,
            views.dead_letter_item,
            lambda r: encode_cursor(
                "dl", r["reviewed_at"] is not None, r["created_at"], r["delivery_id"]
            ),
        )
        return DeadLetterPage(items, cursor)

    async def malformed(self, flt: MalformedFilter, page: PageRequest) -> MalformedPage:
        after = page.after or (None, None)
        async with translate_errors("malformed listing", self.pool):
            rows = await self.pool.fetch(
                q.LIST_MALFORMED,
                flt.failure_code,
                flt.source,
                flt.replayed,
                after[0],
                after[1],
                page.limit + 1,
            )
        items, cursor = _page(
            rows,
            page.limit,
            views.malformed,
            lambda r: encode_cursor("m", r["received_at"], r["id"]),
        )
        return MalformedPage(items, cursor)

    async def malformed_by_id(self, malformed_id: int) -> MalformedCommand | None:
        async with translate_errors("malformed lookup", self.pool):
            row = await self.pool.fetchrow(q.MALFORMED_BY_ID, malformed_id)
        return views.malformed(row) if row is not None else None

    async def command_trace(self, stream_entry_id: str) -> CommandTrace | None:
        async with (
            translate_errors("command lookup", self.pool),
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            created = await conn.fetchrow(q.DELIVERY_BY_ENTRY, stream_entry_id)
            replay_of = await conn.fetchval(q.REPLAY_OF_ENTRY, stream_entry_id)
            bad = await conn.fetchrow(q.MALFORMED_BY_ENTRY, stream_entry_id)
        if created is None and replay_of is None and bad is None:
            return None
        outcome = (
            "delivery"
            if created is not None
            else "duplicate"
            if replay_of is not None
            else "malformed"
        )
        return CommandTrace(
            stream_entry_id=stream_entry_id,
            outcome=outcome,  # type: ignore[arg-type]
            delivery=views.summary(created) if created is not None else None,
            duplicate_of=replay_of,
            malformed=views.malformed(bad) if bad is not None else None,
        )

    async def sending_state(self) -> SendingState:
        async with translate_errors("pause state", self.pool):
            rows = await self.pool.fetch(q.PAUSES)
        return views.sending_state(rows)

    async def stats(self) -> Stats:
        async with (
            translate_errors("stats", self.pool),
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            row = await conn.fetchrow(q.STATS)
            pauses = await conn.fetch(q.PAUSES)
        assert row is not None
        by_status = json.loads(row["by_status"])
        attempts = json.loads(row["attempts_1h"])
        return Stats(
            generated_at=row["generated_at"],
            deliveries_by_status={s: int(by_status.get(s, 0)) for s in DELIVERY_STATUSES},
            backlog=Backlog(
                due=row["due"],
                oldest_due_age_seconds=round(row["oldest_due_s"], 3),
                scheduled=row["scheduled"],
                in_flight=row["in_flight"],
            ),
            dead_letters=DeadLetterCounts(
                unreviewed=row["dl_unreviewed"], open=row["dl_open"], total=row["dl_total"]
            ),
            malformed_commands_last_hour=row["malformed_1h"],
            attempts_last_hour={s: int(attempts.get(s, 0)) for s in ATTEMPT_STATUSES},
            sending=views.sending_state(pauses),
        )

    async def suppressions(self, flt: SuppressionFilter, page: PageRequest) -> SuppressionPage:
        after = page.after[0] if page.after else None
        async with translate_errors("suppression listing", self.pool):
            rows = await self.pool.fetch(
                q.LIST_SUPPRESSIONS, flt.address, flt.domain, after, page.limit + 1
            )
        items, cursor = _page(
            rows,
            page.limit,
            lambda r: Suppression(**dict(r)),
            lambda r: encode_cursor("s", r["address"]),
        )
        return SuppressionPage(items, cursor)

    async def actions(self, flt: ActionFilter, page: PageRequest) -> OperatorActionPage:
        after = page.after[0] if page.after else None
        async with translate_errors("action listing", self.pool):
            rows = await self.pool.fetch(
                q.LIST_ACTIONS, flt.action, flt.actor, flt.target, after, page.limit + 1
            )
        items, cursor = _page(
            rows,
            page.limit,
            lambda r: OperatorAction(**{**dict(r), "detail": json.loads(r["detail"])}),
            lambda r: encode_cursor("a", r["id"]),
        )
        return OperatorActionPage(items, cursor)


# --- helpers -------------------------------------------------------------------------------


def dl_args(flt: DeadLetterFilter) -> tuple[Any, ...]:
    return (
        flt.source,
        flt.recipient_domain,
        flt.reply_code,
        flt.reply_class,
        flt.created_after,
        flt.created_before,
        flt.reviewed,
        flt.requeued,
    )


def _page(
    rows: Sequence[asyncpg.Record],
    limit: int,
    view: Callable[[asyncpg.Record], T],
    key: Callable[[asyncpg.Record], str],
) -> tuple[list[T], str | None]:
    more = len(rows) > limit
    rows = rows[:limit]
    return [view(r) for r in rows], key(rows[-1]) if more and rows else None
