"""PostgreSQL access for the operator surface: lookups, listings, figures and repair actions.

Every action changes its rows and records itself in ``mail.operator_actions`` in one
transaction (who, what, when, why), then wakes the scheduler when something became due.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, cast

import asyncpg

from maildaemon.contract.command import Rejection
from maildaemon.delivery import AttemptResult, IntakeEntry
from maildaemon.errors import Conflict, NotFound
from maildaemon.logs import event
from maildaemon.store import operator_queries as q
from maildaemon.store import operator_rows as views
from maildaemon.store.db import RETRYABLE, Connection, Store, translate_errors, write_outcomes
from maildaemon.store.filters import CANCELLABLE, REQUEUEABLE, DeadLetterFilter, spread_due_times
from maildaemon.store.operator_reads import OperatorReads, dl_args
from maildaemon.store.records import (
    BulkRequeue,
    DeliveryChange,
    MalformedCommand,
    Pause,
    PauseChange,
    Review,
    Suppression,
    SuppressionChange,
)

log = logging.getLogger("maildaemon.operator")
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


class OperatorStore(OperatorReads):
    """The operator's reads (inherited) and repair actions over the daemon's pool."""

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
            row = await _lock_row(tx.conn, delivery_id, CANCELLABLE, "cancelled")
            previous = row["status"]
            now = datetime.now(UTC)
            cancelled = AttemptResult(
                delivery_id=delivery_id,
                source=row["source"],
                claim_token=row["claim_token"],
                attempt_no=row["attempt_count"],
                attempt_status="cancelled",
                delivery_status="cancelled",
                started_at=now,
                finished_at=now,
                status_reason=_reason("cancelled by", actor, reason),
                record_attempt=False,
                claimed=False,
            )
            await write_outcomes(tx.conn, [cancelled], actor, 0.0)
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
        args = dl_args(flt)
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
    status: str = (await _lock_row(conn, delivery_id, allowed, verb))["status"]
    return status


async def _lock_row(
    conn: Connection, delivery_id: str, allowed: frozenset[str], verb: str
) -> asyncpg.Record:
    row: asyncpg.Record | None = await conn.fetchrow(q.LOCK_DELIVERY, delivery_id)
    if row is None:
        raise NotFound(f"no delivery {delivery_id!r}", field="delivery_id")
    if row["status"] not in allowed:
        raise Conflict(
            f"delivery {delivery_id!r} is {row['status']}; only "
            f"{' or '.join(sorted(allowed))} deliveries can be {verb}"
        )
    return row


def _reason(what: str, actor: str, reason: str | None) -> str:
    text = f"{what} {actor}"
    return f"{text}: {reason}" if reason else text
