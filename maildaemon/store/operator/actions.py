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
from maildaemon.logs import event, recipients_field
from maildaemon.store.operator import rows as views
from maildaemon.store.operator import statements as q
from maildaemon.store.operator.filters import (
    CANCELLABLE,
    REQUEUEABLE,
    DeadLetterFilter,
    spread_due_times,
)
from maildaemon.store.operator.reads import OperatorReads, dl_args
from maildaemon.store.operator.records import (
    Actor,
    BulkRequeue,
    DeliveryChange,
    MalformedCommand,
    Pause,
    PauseChange,
    Review,
    Suppression,
    SuppressionChange,
)
from maildaemon.store.pipeline.db import (
    RETRYABLE,
    Connection,
    Store,
    translate_errors,
    write_outcomes,
)

log = logging.getLogger("maildaemon.operator")
PREVIEW_IDS = 100  # ids a bulk requeue's dry run lists
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
        self, who: Actor, action: str, target: str | None, reason: str | None, **detail: Any
    ) -> int:
        """The audit record (who, what, when, why), in the same transaction as the change.

        ``actor`` is the identity (the token's, or the CLI's OS user); a note the caller
        chose about who acts is kept in the detail as ``actor_note``, never as the actor.
        """
        if who.note is not None:
            detail["actor_note"] = who.note
        text = json.dumps(detail, ensure_ascii=False, default=str)
        action_id: int = await self.conn.fetchval(
            q.RECORD_ACTION, who.identity, action, target, reason, text
        )
        self.recorded.append(
            {"action": action, "actor": who.identity, "target": target, "action_id": action_id}
        )
        return action_id


class OperatorStore(OperatorReads):
    """The operator's reads (inherited) and repair actions over the daemon's pool."""

    @contextlib.asynccontextmanager
    async def _action(self, what: str) -> AsyncIterator[_Action]:
        """One action's transaction, logged once committed; a lost race is a Conflict."""
        async with translate_errors(what, self.pool), self.pool.acquire() as conn:
            action = _Action(conn)
            try:
                async with conn.transaction():
                    yield action
            except RETRYABLE:
                raise Conflict(f"{what}: a concurrent change got there first; try again") from None
        for fields in action.recorded:
            event(log, "operator action", **fields)

    # --- delivery actions ----------------------------------------------------------------

    async def requeue(
        self, delivery_id: str, who: Actor, reason: str | None, dry_run: bool = False
    ) -> DeliveryChange:
        """A dead-lettered or failed delivery back to `queued`, due now, ladder restarted.

        A dry run checks the same rules (exists, requeueable) and writes nothing."""
        if dry_run:
            previous, now = await self._check(delivery_id, REQUEUEABLE, "requeued")
            return DeliveryChange(delivery_id, previous, "queued", now, None, dry_run=True)
        async with self._action("requeue") as tx:
            previous = await _lock(tx.conn, delivery_id, REQUEUEABLE, "requeued")
            due = await tx.conn.fetchval(
                q.REQUEUE, delivery_id, _reason("requeued by", who, reason)
            )
            await tx.conn.execute(q.MARK_REQUEUED, delivery_id, who.identity)
            action_id = await tx.record(
                who, "delivery.requeue", delivery_id, reason, previous_status=previous
            )
            await tx.conn.execute(q.NOTIFY_DUE)
        return DeliveryChange(delivery_id, previous, "queued", due, action_id)

    async def _check(
        self, delivery_id: str, allowed: frozenset[str], verb: str
    ) -> tuple[str, datetime]:
        """A dry run's judgement: the delivery's status if the action is allowed, and now."""
        async with (
            translate_errors(f"dry run ({verb})", self.pool),
            self.pool.acquire() as conn,
            conn.transaction(readonly=True),
        ):
            row = await _lock_row(conn, delivery_id, allowed, verb, lock=False)
            now: datetime = await conn.fetchval("SELECT now()")
        return row["status"], now

    async def cancel(
        self, delivery_id: str, who: Actor, reason: str | None, dry_run: bool = False
    ) -> DeliveryChange:
        """A queued delivery (due or scheduled) to `cancelled`; it is never sent.

        A dry run checks the same rules (exists, cancellable) and writes nothing."""
        if dry_run:
            previous, _ = await self._check(delivery_id, CANCELLABLE, "cancelled")
            return DeliveryChange(delivery_id, previous, "cancelled", None, None, dry_run=True)
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
                status_reason=_reason("cancelled by", who, reason),
                record_attempt=False,
                claimed=False,
            )
            await write_outcomes(tx.conn, [cancelled], who.identity, 0.0)
            action_id = await tx.record(
                who, "delivery.cancel", delivery_id, reason, previous_status=previous
            )
        addresses = (*row["to_addrs"], *row["cc_addrs"], *row["bcc_addrs"])
        event(
            log,
            "delivery cancelled",
            logging.WARNING,
            delivery_id=delivery_id,
            source=row["source"],
            attempt=row["attempt_count"],
            status="cancelled",
            reply_code=None,
            recipients=recipients_field(addresses),
            reason=cancelled.status_reason,
        )
        return DeliveryChange(delivery_id, previous, "cancelled", None, action_id)

    async def review(self, delivery_id: str, who: Actor, note: str, reason: str | None) -> Review:
        """Mark a dead letter reviewed: the note is kept on it and, with the reason, in the
        audit trail."""
        async with self._action("review") as tx:
            row = await tx.conn.fetchrow(q.REVIEW, delivery_id, who.identity, note)
            if row is None:
                raise NotFound(f"no dead letter for delivery {delivery_id!r}", field="delivery_id")
            action_id = await tx.record(who, "dead_letter.review", delivery_id, reason, note=note)
        return Review(**dict(row), action_id=action_id)

    async def bulk_requeue(
        self,
        flt: DeadLetterFilter,
        limit: int,
        rate_per_second: float | None,
        who: Actor,
        reason: str | None,
        dry_run: bool,
    ) -> BulkRequeue:
        """Requeue matching dead letters, released at ``rate_per_second`` (None: all now).

        A dry run writes nothing: it counts the matches and lists (up to ``PREVIEW_IDS``)
        the ids that would be requeued, in release order."""
        args = dl_args(flt)
        if dry_run:
            async with (
                translate_errors("bulk requeue", self.pool),
                self.pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                matched = int(await conn.fetchval(q.COUNT_REQUEUEABLE, *args))
                shown = min(limit, PREVIEW_IDS)
                ids = [
                    r["delivery_id"] for r in await conn.fetch(q.BULK_REQUEUE_PREVIEW, *args, shown)
                ]
                now: datetime = await conn.fetchval("SELECT now()")
            would = min(matched, limit)
            first, last = spread_due_times(would, rate_per_second, now)
            return BulkRequeue(True, matched, 0, would, ids, first, last, rate_per_second, None)
        gap = 1.0 / rate_per_second if rate_per_second else 0.0
        status_reason = _reason("requeued in bulk by", who, reason)
        async with self._action("bulk requeue") as tx:
            matched = int(await tx.conn.fetchval(q.COUNT_REQUEUEABLE, *args))
            rows = await tx.conn.fetch(
                q.BULK_REQUEUE, *args, limit, gap, status_reason, who.identity
            )
            ids = [r["delivery_id"] for r in rows]
            action_id = None
            if ids:
                action_id = await tx.record(
                    who,
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
        return BulkRequeue(
            False, matched, len(ids), len(ids), ids, first, last, rate_per_second, action_id
        )

    # --- malformed replay ----------------------------------------------------------------

    async def replayable(
        self, failure_code: str, source: str | None, limit: int
    ) -> tuple[int, list[MalformedCommand]]:
        """How many unreplayed records match, and the oldest ``limit`` of them."""
        async with translate_errors("replay candidates", self.pool), self.pool.acquire() as conn:
            matched = int(await conn.fetchval(q.COUNT_REPLAYABLE, failure_code, source))
            rows = await conn.fetch(q.REPLAYABLE, failure_code, source, limit)
        return matched, [views.malformed(r) for r in rows]

    async def replay(
        self,
        entries: Sequence[tuple[int, IntakeEntry]],
        window: float,
        who: Actor,
        reason: str | None,
        detail: dict[str, Any],
    ) -> tuple[dict[int, ReplayOutcome], int]:
        """Take now-valid commands in and mark their records replayed, in one transaction.

        Returns, per malformed record id, what intake made of it (a new delivery, a
        duplicate of an existing one, or a refusal such as an idempotency conflict), and
        the audit record's id. Records replayed meanwhile by someone else are left out.
        Every replay is recorded, also one that took nothing in (``detail`` says why).
        """
        async with self._action("replay") as tx:
            candidates = [i for i, _ in entries]
            locked = {r["id"] for r in await tx.conn.fetch(q.LOCK_REPLAYABLE, candidates)}
            todo = [(i, e) for i, e in entries if i in locked]
            outcome = await _ingest(tx.conn, todo, window) if todo else {}
            done = [(i, d) for i, (_, d, _) in outcome.items() if d is not None]
            if done:
                await tx.conn.execute(q.MARK_REPLAYED, [i for i, _ in done], [d for _, d in done])
            target = str(done[0][0]) if len(done) == 1 else None
            refused = [
                {"id": i, "failure_code": r.failure_code}
                for i, (_, _, r) in outcome.items()
                if r is not None
            ]
            action_id = await tx.record(
                who,
                "malformed.replay",
                target,
                reason,
                **detail,
                replayed=[{"id": i, "delivery_id": d} for i, d in done],
                refused_at_intake=refused,
                replayed_meanwhile=sorted(set(candidates) - locked),
            )
        return outcome, action_id

    # --- sending pauses ------------------------------------------------------------------

    async def pause(self, scope: str, who: Actor, reason: str | None) -> PauseChange:
        async with self._action("pause") as tx:
            row = await tx.conn.fetchrow(q.PAUSE, scope, who.identity, reason)
            changed = row is not None
            if row is None:
                row = await tx.conn.fetchrow(q.PAUSE_OF, scope)
            assert row is not None
            action_id = await tx.record(who, "sending.pause", scope, reason, changed=changed)
        return PauseChange(scope, True, changed, Pause(**dict(row)), action_id)

    async def resume(self, scope: str, who: Actor, reason: str | None) -> PauseChange:
        async with self._action("resume") as tx:
            changed = await tx.conn.fetchval(q.RESUME, scope) is not None
            action_id = await tx.record(who, "sending.resume", scope, reason, changed=changed)
            if changed:
                await tx.conn.execute(q.NOTIFY_DUE)
        return PauseChange(scope, False, changed, None, action_id)

    # --- suppressions --------------------------------------------------------------------

    async def suppress(
        self, address: str, reason: str | None, expires_at: datetime | None, who: Actor
    ) -> SuppressionChange:
        async with self._action("suppress") as tx:
            row = await tx.conn.fetchrow(
                q.ADD_SUPPRESSION,
                address,
                reason or f"added by {who.identity}",
                expires_at,
                who.identity,
            )
            assert row is not None
            action_id = await tx.record(
                who,
                "suppression.add",
                address,
                reason,
                expires_at=expires_at.isoformat() if expires_at else None,
            )
        return SuppressionChange(address, True, Suppression(**dict(row)), action_id)

    async def unsuppress(self, address: str, who: Actor, reason: str | None) -> SuppressionChange:
        async with self._action("unsuppress") as tx:
            if await tx.conn.fetchval(q.REMOVE_SUPPRESSION, address) is None:
                raise NotFound(f"{address!r} is not on the suppression list", field="address")
            action_id = await tx.record(who, "suppression.remove", address, reason)
        return SuppressionChange(address, False, None, action_id)


# --- helpers ---------------------------------------------------------------------------------


async def _ingest(
    conn: Connection, todo: Sequence[tuple[int, IntakeEntry]], window: float
) -> dict[int, ReplayOutcome]:
    """The intake transaction, run as a savepoint of the replay's transaction."""
    ids = {e.stream_entry_id: i for i, e in todo}
    store = Store(cast(asyncpg.Pool, _InTransaction(conn)))
    result = await store.ingest([e for _, e in todo], window)
    outcome: dict[int, ReplayOutcome] = {}
    for entry in result.created:
        assert entry.command is not None
        outcome[ids[entry.stream_entry_id]] = ("accepted", entry.command.delivery_id, None)
    for entry, existing in result.replays:
        outcome[ids[entry.stream_entry_id]] = ("duplicate", existing, None)
    for entry, rejection in result.rejected:
        outcome[ids[entry.stream_entry_id]] = ("still_invalid", None, rejection)
    return outcome


async def _lock(conn: Connection, delivery_id: str, allowed: frozenset[str], verb: str) -> str:
    status: str = (await _lock_row(conn, delivery_id, allowed, verb))["status"]
    return status


async def _lock_row(
    conn: Connection, delivery_id: str, allowed: frozenset[str], verb: str, *, lock: bool = True
) -> asyncpg.Record:
    statement = q.LOCK_DELIVERY if lock else q.DELIVERY_STATE
    row: asyncpg.Record | None = await conn.fetchrow(statement, delivery_id)
    if row is None:
        raise NotFound(f"no delivery {delivery_id!r}", field="delivery_id")
    if row["status"] not in allowed:
        raise Conflict(
            f"delivery {delivery_id!r} is {row['status']}; only "
            f"{' or '.join(sorted(allowed))} deliveries can be {verb}"
        )
    return row


def _reason(what: str, who: Actor, reason: str | None) -> str:
    text = f"{what} {who.identity}"
    return f"{text}: {reason}" if reason else text
