"""PostgreSQL access for the operator surface: lookups, listings, figures and repair actions.

Every action changes its rows and records itself in ``mail.operator_actions`` in one
transaction (who, what, when, why), then wakes the scheduler when something became due.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar, cast

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from maildaemon.logs import event
from maildaemon.models import IntakeEntry
from maildaemon.operator_model import (
    ATTEMPT_STATUSES,
    CANCELLABLE,
    DELIVERY_STATUSES,
    REQUEUEABLE,
    ActionFilter,
    Conflict,
    DeadLetterFilter,
    DeliveryFilter,
    MalformedFilter,
    NotFound,
    PageRequest,
    SuppressionFilter,
    encode_cursor,
    spread_due_times,
)
from maildaemon.operator_views import (
    Backlog,
    BulkRequeue,
    CommandTrace,
    DeadLetter,
    DeadLetterCounts,
    DeadLetterPage,
    DeliveryChange,
    DeliveryPage,
    DeliveryRecord,
    MalformedCommand,
    MalformedPage,
    OperatorAction,
    OperatorActionPage,
    Pause,
    PauseChange,
    Review,
    SendingState,
    Stats,
    Suppression,
    SuppressionChange,
    SuppressionPage,
)
from maildaemon.parsing import Rejection
from maildaemon.store import operator_queries as q
from maildaemon.store import operator_rows as views
from maildaemon.store.db import RETRYABLE, Store, translate_errors

log = logging.getLogger("maildaemon.operator")
T = TypeVar("T")
Connection = asyncpg.Connection | PoolConnectionProxy
# What intake made of a replayed command: its outcome, the delivery, or why it was refused.
ReplayOutcome = tuple[
    Literal["accepted", "duplicate", "still_invalid"], str | None, Rejection | None
]


class _InTransaction:
    """A stand-in pool whose one connection is inside our transaction.

    ``Store.ingest`` runs on it unchanged: its own transaction becomes a savepoint, so a
    replayed command and the record of its replay commit together.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Connection]:
        yield self._conn


class _Action:
    """An operator action in progress: its connection (in a transaction) and audit records."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.recorded: list[dict[str, Any]] = []

    async def record(
        self, actor: str, action: str, target: str | None, reason: str | None, **detail: Any
    ) -> int:
        """The audit record (who, what, when, why), in the same transaction as the change."""
        action_id: int = await self.conn.fetchval(
            q.RECORD_ACTION, actor, action, target, reason, json.dumps(detail, ensure_ascii=False)
        )
        self.recorded.append(
            {"action": action, "actor": actor, "target": target, "action_id": action_id}
        )
        return action_id


class OperatorStore:
    """The operator's reads and actions over the daemon's pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @contextlib.asynccontextmanager
    async def _action(self, what: str) -> AsyncIterator[_Action]:
        """One action's transaction, logged once committed; a lost race is a Conflict."""
        async with translate_errors(what), self.pool.acquire() as conn:
            action = _Action(conn)
            try:
                async with conn.transaction():
                    yield action
            except RETRYABLE:
                raise Conflict(f"{what}: a concurrent change got there first; try again") from None
        for fields in action.recorded:
            event(log, "operator action", **fields)

    # --- reads ---------------------------------------------------------------------------

    async def delivery(self, delivery_id: str) -> DeliveryRecord | None:
        async with (
            translate_errors("delivery lookup"),
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            row = await conn.fetchrow(q.DELIVERY, delivery_id)
            if row is None:
                return None
            attempts = await conn.fetch(q.ATTEMPTS, delivery_id)
            dead = await conn.fetchrow(q.DEAD_LETTER, delivery_id)
        return views.delivery_record(
            row,
            [views.attempt(a) for a in attempts],
            DeadLetter(**dict(dead)) if dead is not None else None,
        )

    async def deliveries(self, flt: DeliveryFilter, page: PageRequest) -> DeliveryPage:
        after = page.after or (None, None)
        async with translate_errors("delivery listing"):
            rows = await self.pool.fetch(
                q.LIST_DELIVERIES,
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
        async with translate_errors("dead-letter listing"):
            rows = await self.pool.fetch(
                q.LIST_DEAD_LETTERS, *_dl_args(flt), *after, page.limit + 1
            )
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
        async with translate_errors("malformed listing"):
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
        async with translate_errors("malformed lookup"):
            row = await self.pool.fetchrow(q.MALFORMED_BY_ID, malformed_id)
        return views.malformed(row) if row is not None else None

    async def command_trace(self, stream_entry_id: str) -> CommandTrace | None:
        async with (
            translate_errors("command lookup"),
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
        async with translate_errors("pause state"):
            rows = await self.pool.fetch(q.PAUSES)
        return views.sending_state(rows)

    async def stats(self) -> Stats:
        async with (
            translate_errors("stats"),
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
        async with translate_errors("suppression listing"):
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
        async with translate_errors("action listing"):
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

    # --- delivery actions ----------------------------------------------------------------

    async def requeue(self, delivery_id: str, actor: str, reason: str | None) -> DeliveryChange:
        """A dead-lettered or failed delivery back to `queued`, due now, ladder restarted."""
        async with self._action("requeue") as tx:
            previous = await _lock(tx.conn, delivery_id, REQUEUEABLE, "requeued")
            due = await tx.conn.fetchval(
                q.REQUEUE, delivery_id, _reason("requeued by", actor, reason)
            )
            await tx.conn.execute(q.MARK_REQUEUED, delivery_id, actor)
            action_id = await tx.record(
                actor, "delivery.requeue", delivery_id, reason, previous_status=previous
            )
            await tx.conn.execute(q.NOTIFY_DUE)
        return DeliveryChange(delivery_id, previous, "queued", due, action_id)

    async def cancel(self, delivery_id: str, actor: str, reason: str | None) -> DeliveryChange:
        """A queued delivery (due or scheduled) to `cancelled`; it is never sent."""
        async with self._action("cancel") as tx:
            previous = await _lock(tx.conn, delivery_id, CANCELLABLE, "cancelled")
            await tx.conn.execute(q.CANCEL, delivery_id, _reason("cancelled by", actor, reason))
            action_id = await tx.record(
                actor, "delivery.cancel", delivery_id, reason, previous_status=previous
            )
        return DeliveryChange(delivery_id, previous, "cancelled", None, action_id)

    async def review(self, delivery_id: str, actor: str, note: str) -> Review:
        async with self._action("review") as tx:
            row = await tx.conn.fetchrow(q.REVIEW, delivery_id, actor, note)
            if row is None:
                raise NotFound(f"no dead letter for delivery {delivery_id!r}", field="delivery_id")
            action_id = await tx.record(actor, "dead_letter.review", delivery_id, note)
        return Review(**dict(row), action_id=action_id)

    async def bulk_requeue(
        self,
        flt: DeadLetterFilter,
        limit: int,
        rate_per_second: float | None,
        actor: str,
        reason: str | None,
        dry_run: bool,
    ) -> BulkRequeue:
        """Requeue matching dead letters, released at ``rate_per_second`` (None: all now)."""
        args = _dl_args(flt)
        if dry_run:
            async with translate_errors("bulk requeue"), self.pool.acquire() as conn:
                matched = int(await conn.fetchval(q.COUNT_REQUEUEABLE, *args))
                now: datetime = await conn.fetchval("SELECT now()")
            first, last = spread_due_times(min(matched, limit), rate_per_second, now)
            return BulkRequeue(True, matched, 0, [], first, last, rate_per_second, None)
        gap = 1.0 / rate_per_second if rate_per_second else 0.0
        status_reason = _reason("requeued in bulk by", actor, reason)
        async with self._action("bulk requeue") as tx:
            matched = int(await tx.conn.fetchval(q.COUNT_REQUEUEABLE, *args))
            rows = await tx.conn.fetch(q.BULK_REQUEUE, *args, limit, gap, status_reason, actor)
            ids = [r["delivery_id"] for r in rows]
            action_id = None
            if ids:
                action_id = await tx.record(
                    actor,
                    "dead_letters.requeue",
                    None,
                    reason,
                    filter=flt.describe(),
                    rate_per_second=rate_per_second,
                    count=len(ids),
                    delivery_ids=ids,
                )
                await tx.conn.execute(q.NOTIFY_DUE)
        first, last = (
            (rows[0]["next_attempt_at"], rows[-1]["next_attempt_at"]) if rows else (None, None)
        )
        return BulkRequeue(False, matched, len(ids), ids, first, last, rate_per_second, action_id)

    # --- malformed replay ----------------------------------------------------------------

    async def replayable(
        self, failure_code: str, source: str | None, limit: int
    ) -> tuple[int, list[MalformedCommand]]:
        """How many unreplayed records match, and the oldest ``limit`` of them."""
        async with translate_errors("replay candidates"), self.pool.acquire() as conn:
            matched = int(await conn.fetchval(q.COUNT_REPLAYABLE, failure_code, source))
            rows = await conn.fetch(q.REPLAYABLE, failure_code, source, limit)
        return matched, [views.malformed(r) for r in rows]

    async def replay(
        self,
        entries: Sequence[tuple[int, IntakeEntry]],
        window: float,
        actor: str,
        reason: str | None,
        detail: dict[str, Any],
    ) -> tuple[dict[int, ReplayOutcome], int | None]:
        """Take now-valid commands in and mark their records replayed, in one transaction.

        Returns, per malformed record id, what intake made of it (a new delivery, a
        duplicate of an existing one, or a refusal such as an idempotency conflict), and
        the audit record's id. Records replayed meanwhile by someone else are left out.
        """
        async with self._action("replay") as tx:
            candidates = [i for i, _ in entries]
            locked = {r["id"] for r in await tx.conn.fetch(q.LOCK_REPLAYABLE, candidates)}
            todo = [(i, e) for i, e in entries if i in locked]
            if not todo:
                return {}, None
            ids = {e.stream_entry_id: i for i, e in todo}
            store = Store(cast(asyncpg.Pool, _InTransaction(tx.conn)))
            result = await store.ingest([e for _, e in todo], window)
            outcome: dict[int, ReplayOutcome] = {}
            for entry in result.created:
                assert entry.command is not None
                outcome[ids[entry.stream_entry_id]] = ("accepted", entry.command.delivery_id, None)
            for entry, existing in result.replays:
                outcome[ids[entry.stream_entry_id]] = ("duplicate", existing, None)
            for entry, rejection in result.rejected:
                outcome[ids[entry.stream_entry_id]] = ("still_invalid", None, rejection)
            done = [(i, d) for i, (_, d, _) in outcome.items() if d is not None]
            if not done:
                return outcome, None
            await tx.conn.execute(q.MARK_REPLAYED, [i for i, _ in done], [d for _, d in done])
            target = str(done[0][0]) if len(done) == 1 else None
            replayed = [{"id": i, "delivery_id": d} for i, d in done]
            action_id = await tx.record(
                actor, "malformed.replay", target, reason, **detail, replayed=replayed
            )
        return outcome, action_id

    # --- sending pauses ------------------------------------------------------------------

    async def pause(self, scope: str, actor: str, reason: str | None) -> PauseChange:
        async with self._action("pause") as tx:
            row = await tx.conn.fetchrow(q.PAUSE, scope, actor, reason)
            changed = row is not None
            if row is None:
                row = await tx.conn.fetchrow(q.PAUSE_OF, scope)
            assert row is not None
            action_id = await tx.record(actor, "sending.pause", scope, reason, changed=changed)
        return PauseChange(scope, True, changed, Pause(**dict(row)), action_id)

    async def resume(self, scope: str, actor: str, reason: str | None) -> PauseChange:
        async with self._action("resume") as tx:
            changed = await tx.conn.fetchval(q.RESUME, scope) is not None
            action_id = await tx.record(actor, "sending.resume", scope, reason, changed=changed)
            if changed:
                await tx.conn.execute(q.NOTIFY_DUE)
        return PauseChange(scope, False, changed, None, action_id)

    # --- suppressions --------------------------------------------------------------------

    async def suppress(
        self, address: str, reason: str | None, expires_at: datetime | None, actor: str
    ) -> SuppressionChange:
        async with self._action("suppress") as tx:
            row = await tx.conn.fetchrow(
                q.ADD_SUPPRESSION, address, reason or f"added by {actor}", expires_at, actor
            )
            assert row is not None
            action_id = await tx.record(
                actor,
                "suppression.add",
                address,
                reason,
                expires_at=expires_at.isoformat() if expires_at else None,
            )
        return SuppressionChange(address, True, Suppression(**dict(row)), action_id)

    async def unsuppress(self, address: str, actor: str, reason: str | None) -> SuppressionChange:
        async with self._action("unsuppress") as tx:
            if await tx.conn.fetchval(q.REMOVE_SUPPRESSION, address) is None:
                raise NotFound(f"{address!r} is not on the suppression list", field="address")
            action_id = await tx.record(actor, "suppression.remove", address, reason)
        return SuppressionChange(address, False, None, action_id)


# --- helpers ---------------------------------------------------------------------------------


async def _lock(conn: Connection, delivery_id: str, allowed: frozenset[str], verb: str) -> str:
    status: str | None = await conn.fetchval(q.LOCK_DELIVERY, delivery_id)
    if status is None:
        raise NotFound(f"no delivery {delivery_id!r}", field="delivery_id")
    if status not in allowed:
        raise Conflict(
            f"delivery {delivery_id!r} is {status}; only "
            f"{' or '.join(sorted(allowed))} deliveries can be {verb}"
        )
    return status


def _reason(what: str, actor: str, reason: str | None) -> str:
    text = f"{what} {actor}"
    return f"{text}: {reason}" if reason else text


def _dl_args(flt: DeadLetterFilter) -> tuple[Any, ...]:
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
