"""PostgreSQL access for the delivery pipeline. Only this package sees SQL and asyncpg."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import datetime

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from maildaemon.addresses import lookup_key
from maildaemon.contract.command import Rejection
from maildaemon.delivery import (
    AttemptResult,
    ClaimedDelivery,
    IntakeEntry,
    IntakeResult,
    LateOutcome,
    RenderedPin,
)
from maildaemon.errors import StoreReadOnly, StoreRejected
from maildaemon.store import codecs
from maildaemon.store.listen import listen
from maildaemon.store.pgerrors import RETRYABLE, translate_errors
from maildaemon.store.pipeline import rows as convert
from maildaemon.store.pipeline import statements as q
from maildaemon.store.pipeline.late import write_late
from maildaemon.store.webhooks import db as webhooks
from maildaemon.store.webhooks import statements as webhook_sql

__all__ = ["RETRYABLE", "Connection", "Store", "translate_errors", "write_outcomes"]

log = logging.getLogger("maildaemon.store")
Connection = asyncpg.Connection | PoolConnectionProxy
_Fresh = tuple[IntakeEntry, bytes, str]


async def _keep_session(_: asyncpg.Connection) -> None:
    """Release a connection without asyncpg's reset statement (advisory unlock, CLOSE ALL,
    UNLISTEN, RESET ALL): one more round trip on every release, for session state this
    store never creates. Its advisory locks are transaction-scoped, it LISTENs only on its
    own connection (``listen``), sets no session settings beyond the startup ones and holds
    no cursor past a transaction. An open transaction is still rolled back by the pool."""


class Store:
    """The daemon's PostgreSQL state behind typed methods."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        # Names this process in its due notifications (it wakes its own scheduler directly).
        self.origin = uuid.uuid4().hex

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        statement_timeout: float | None = None,
        application_name: str = "maildaemon",
        pgbouncer: bool = False,
    ) -> Store:
        """A pool; ``statement_timeout`` (seconds) bounds every statement run on it.

        ``pgbouncer``: behind PgBouncer in transaction pooling, where a prepared statement
        does not outlive its transaction's server connection and only a few startup
        parameters pass: no statement cache, no server settings but the application name
        (set ``jit=off`` on the role there), and the statement timeout enforced by the
        client (asyncpg cancels the statement)."""
        # JIT compilation costs far more than these short statements save.
        settings = {"application_name": application_name, "jit": "off"}
        if statement_timeout is not None:
            settings["statement_timeout"] = str(max(1, round(statement_timeout * 1000)))
            # Plans for these parameters, not a generic one: an optional filter that was
            # given can then use its index ("$3 IS NULL OR ..." folds away).
            settings["plan_cache_mode"] = "force_custom_plan"
        if pgbouncer:
            settings = {"application_name": application_name}
        command_timeout = statement_timeout if pgbouncer and statement_timeout else 60
        async with translate_errors("open pool"):
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                command_timeout=command_timeout,
                server_settings=settings,
                statement_cache_size=0 if pgbouncer else 100,
                init=codecs.install,
                reset=_keep_session,
            )
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    async def applied_migrations(self) -> set[str]:
        async with translate_errors("applied migrations", self.pool):
            try:
                rows = await self.pool.fetch(q.APPLIED_MIGRATIONS)
            except asyncpg.exceptions.UndefinedTableError:
                return set()
        return {r["migration_id"] for r in rows}

    async def ping(self) -> None:
        async with translate_errors("ping", self.pool):
            await self.pool.fetchval("SELECT 1")

    async def check_writable(self) -> None:
        """Raise ``StoreReadOnly`` when PostgreSQL answers but would refuse a write (a
        standby, a demoted primary, ``default_transaction_read_only``)."""
        async with translate_errors("writable check", self.pool):
            read_only = await self.pool.fetchval(q.READ_ONLY)
        if read_only:
            raise StoreReadOnly("PostgreSQL is read-only (a standby or read-only mode)")

    # --- intake -------------------------------------------------------------------------

    async def ingest(
        self, entries: Sequence[IntakeEntry], idempotency_window: float
    ) -> IntakeResult:
        """Take a batch of validated stream entries in, in one transaction."""
        result = IntakeResult()
        fresh: dict[str, _Fresh] = {}  # delivery_id -> (entry, fingerprint, row as JSON)
        by_key: dict[tuple[str, str], str] = {}
        malformed: list[tuple[IntakeEntry, Rejection]] = []
        for entry in entries:
            cmd = entry.command
            if cmd is None:
                assert entry.rejection is not None
                malformed.append((entry, entry.rejection))
                continue
            try:  # whatever one command does while being hashed or serialised stays its own
                fp = cmd.fingerprint()
                row = json.dumps(convert.delivery_row(entry, fp), ensure_ascii=False)
            except Exception as exc:
                malformed.append((entry, convert.unprocessable(entry, exc)))
                continue
            key = (cmd.source, cmd.idempotency_key)
            prior_id = by_key.get(key) or (cmd.delivery_id if cmd.delivery_id in fresh else None)
            if prior_id is None:
                fresh[cmd.delivery_id] = (entry, fp, row)
                by_key[key] = cmd.delivery_id
                continue
            _prior_entry, prior_fp, _row = fresh[prior_id]
            if prior_fp == fp and prior_id == cmd.delivery_id:
                result.replays.append((entry, prior_id))
            else:
                malformed.append((entry, convert.conflict(entry, prior_id, key in by_key)))

        async with (
            translate_errors("ingest", self.pool),
            self.pool.acquire() as conn,
            conn.transaction(),
        ):
            if fresh:
                await self._insert_fresh(conn, fresh, idempotency_window, result, malformed)
            if result.replays:
                await conn.execute(
                    q.RECORD_REPLAYS,
                    [e.stream_entry_id for e, _ in result.replays],
                    [d for _, d in result.replays],
                )
            if malformed:
                await conn.execute(
                    q.RECORD_MALFORMED,
                    [e.stream_entry_id for e, _ in malformed],
                    [r.failure_code for _, r in malformed],
                    [convert.clean_text(r.failure_detail) for _, r in malformed],
                    [convert.clean_text(r.delivery_id) for _, r in malformed],
                    [convert.clean_text(r.source) for _, r in malformed],
                    [convert.clean_text(e.raw) for e, _ in malformed],
                    [e.raw_truncated for e, _ in malformed],
                )
        result.rejected.extend(malformed)
        return result

    async def _insert_fresh(
        self,
        conn: PoolConnectionProxy,
        fresh: dict[str, _Fresh],
        window: float,
        result: IntakeResult,
        malformed: list[tuple[IntakeEntry, Rejection]],
    ) -> None:
        cmds = {did: e.command for did, (e, _, _) in fresh.items() if e.command is not None}
        reserved_now = await conn.fetch(
            q.INGEST_FRESH,
            [c.source for c in cmds.values()],
            [c.idempotency_key for c in cmds.values()],
            list(cmds),
            [fp for _, fp, _ in fresh.values()],
            window,
            "[" + ",".join(row for _, _, row in fresh.values()) + "]",
            self.origin,
        )
        reserved = {r["delivery_id"]: bool(r["inserted"]) for r in reserved_now}
        taken = [did for did in cmds if did not in reserved]
        if taken:
            rows = await conn.fetch(
                q.EXISTING_RESERVATIONS,
                [cmds[d].source for d in taken],
                [cmds[d].idempotency_key for d in taken],
            )
            holders = {(r["source"], r["idempotency_key"]): r for r in rows}
            for did in taken:
                entry, fp, _ = fresh[did]
                holder = holders.get((cmds[did].source, cmds[did].idempotency_key))
                if (
                    holder is not None
                    and holder["delivery_id"] == did
                    and bytes(holder["command_hash"]) == fp
                ):
                    result.replays.append((entry, did))
                else:
                    malformed.append(
                        (
                            entry,
                            convert.conflict(
                                entry, holder["delivery_id"] if holder else None, True
                            ),
                        )
                    )
        missing = [did for did in cmds if reserved.get(did) is False]
        result.created.extend(fresh[did][0] for did in cmds if reserved.get(did))
        if not missing:
            return
        # The delivery id exists already (its reservation had expired, or another key).
        existing = {
            r["delivery_id"]: bytes(r["command_hash"])
            for r in await conn.fetch(q.EXISTING_DELIVERY_HASHES, missing)
        }
        dropped: list[str] = []
        for did in missing:
            entry, fp, _ = fresh[did]
            if existing.get(did) == fp:
                result.replays.append((entry, did))
            else:
                dropped.append(did)
                malformed.append(
                    (
                        entry,
                        Rejection(
                            "delivery_id_conflict",
                            f"delivery_id {did!r} already belongs to a different command",
                            did,
                            cmds[did].source,
                        ),
                    )
                )
        if dropped:
            await conn.execute(
                q.DROP_RESERVATIONS,
                [cmds[d].source for d in dropped],
                [cmds[d].idempotency_key for d in dropped],
            )

    # --- scheduler ----------------------------------------------------------------------

    async def claim_due(
        self, limit: int, lease_seconds: float, worker: str, ref: str | None = None
    ) -> list[ClaimedDelivery]:
        """Lease up to ``limit`` due deliveries, skipping paused scopes (read by the same
        statement); ``ref`` names this claim statement (see :meth:`release_lost`)."""
        async with translate_errors("claim", self.pool):
            ref = ref or uuid.uuid4().hex
            rows = await self.pool.fetch(q.CLAIM_DUE, limit, lease_seconds, worker, ref)
        return [convert.claimed_or_unreadable(r) for r in rows]

    async def release_lost(self, refs: Iterable[str]) -> int:
        """Give back what claim statements ``refs`` leased, if they committed at all."""
        refs = list(refs)
        if not refs:
            return 0
        async with translate_errors("release lost claims", self.pool):
            return int(await self.pool.fetchval(q.RELEASE_LOST_CLAIMS, refs))

    async def release(self, claims: Iterable[ClaimedDelivery]) -> int:
        claims = list(claims)
        if not claims:
            return 0
        async with translate_errors("release", self.pool):
            released = await self.pool.fetchval(
                q.RELEASE_CLAIMS, [c.delivery_id for c in claims], [c.claim_token for c in claims]
            )
        return int(released)

    async def pin_rendered(self, pins: Sequence[RenderedPin]) -> set[str]:
        if not pins:
            return set()
        async with translate_errors("pin rendered", self.pool):
            rows = await self.pool.fetch(
                q.PIN_RENDERED,
                [p.delivery_id for p in pins],
                [p.claim_token for p in pins],
                [p.message_id for p in pins],
                [p.content_hash for p in pins],
                [p.rendered for p in pins],
                [p.locale for p in pins],
            )
        return {r["delivery_id"] for r in rows}

    async def active_suppressions(self, addresses: Iterable[str]) -> dict[str, str]:
        """Address (as given) -> reason, for those on the list under their canonical key."""
        keys = {a: lookup_key(a) for a in addresses}
        if not keys:
            return {}
        async with translate_errors("suppressions", self.pool):
            rows = await self.pool.fetch(q.ACTIVE_SUPPRESSIONS, sorted(set(keys.values())))
        found = {r["address"]: r["reason"] for r in rows}
        return {a: found[k] for a, k in keys.items() if k in found}

    async def record_results(
        self, results: Sequence[AttemptResult], worker: str, suppression_ttl: float
    ) -> set[str]:
        """Write a batch of results in one transaction; returns the ids the fence let in.

        Without an address to suppress that is one statement, sent on its own (atomic
        as it is): no BEGIN and COMMIT round trips around it."""
        if not results:
            return set()
        if not any(r.suppress for r in results):
            async with translate_errors("record results", self.pool), self.pool.acquire() as conn:
                return await write_outcomes(conn, results, worker, suppression_ttl)
        async with (
            translate_errors("record results", self.pool),
            self.pool.acquire() as conn,
            conn.transaction(),
        ):
            return await write_outcomes(conn, results, worker, suppression_ttl)

    @contextlib.asynccontextmanager
    async def outbox_batch(
        self, limit: int, on_queued: Callable[[], None] | None = None
    ) -> AsyncIterator[list[dict[str, str | int | float]]]:
        """The oldest unpublished outcome events, deleted when the block exits normally.

        Only one replica holds a batch at a time; the others get an empty list. An error
        inside the block keeps the events for the next try (at least once). The batch is
        fanned out to the webhook queues in the same transaction; ``on_queued`` is called
        once that committed with webhooks queued (their dispatcher can claim them now).
        """
        async with (
            translate_errors("outbox", self.pool),
            self.pool.acquire() as conn,
            conn.transaction(),
        ):
            rows = await conn.fetch(q.OUTBOX_BATCH, limit)  # none without the lock
            yield [convert.stream_fields(r["fields"]) for r in rows]
            # Redis took them: the same events into the webhook queues, and the rows deleted.
            queued = await webhooks.fan_out(conn, [r["id"] for r in rows])
        if queued and on_queued is not None:
            on_queued()

    async def outbox_depth(self) -> int:
        async with translate_errors("outbox depth", self.pool):
            return int(await self.pool.fetchval(q.OUTBOX_DEPTH))

    async def next_due_at(self) -> datetime | None:
        async with translate_errors("next due", self.pool):
            value: datetime | None = await self.pool.fetchval(q.NEXT_DUE_AT)
        return value

    async def schedule_depth(self) -> tuple[int, int, int]:
        """Due deliveries, the oldest one's wait (ms), and unreviewed dead letters."""
        async with translate_errors("schedule depth", self.pool):
            row = await self.pool.fetchrow(q.SCHEDULE_DEPTH)
        assert row is not None
        return int(row["depth"]), int(row["oldest_age_ms"]), int(row["dead_letters_unreviewed"])

    async def purge(
        self, batch: int, delivery_age: float, malformed_age: float, report_age: float = 2592000
    ) -> dict[str, int]:
        """One bounded retention pass; returns rows deleted per kind."""
        steps = {
            "reports": (q.PURGE_REPORTS, (report_age,)),
            "idempotency_reservations": (q.PURGE_RESERVATIONS, ()),
            "deliveries": (q.PURGE_DELIVERIES, (delivery_age,)),
            "malformed_commands": (q.PURGE_MALFORMED, (malformed_age,)),
            "command_replays": (q.PURGE_REPLAYS, (delivery_age,)),
            "suppressions": (q.PURGE_SUPPRESSIONS, ()),
            "webhook_events": (webhook_sql.PURGE_EVENTS, (delivery_age,)),
        }
        deleted: dict[str, int] = {}
        async with translate_errors("retention", self.pool):
            for kind, (sql, args) in steps.items():
                status = await self.pool.execute(sql, batch, *args)
                deleted[kind] = int(status.split()[-1])
        return deleted

    def listen(
        self, channel: str, callback: Callable[[], None], dsn: str | None = None
    ) -> contextlib.AbstractAsyncContextManager[asyncio.Event]:
        """LISTEN on ``channel`` while the context is open (``store.listen``); a
        notification this store sent itself (its ``origin`` as payload) is not passed on."""
        return listen(self.pool, channel, callback, dsn, ignore=self.origin)


async def write_outcomes(
    conn: Connection,
    results: Sequence[AttemptResult],
    worker: str,
    suppression_ttl: float,
    late: Sequence[LateOutcome] = (),
    report_id: int = 0,
) -> set[str]:
    """The one terminal-outcome path: every way a delivery ends or is rescheduled (sent,
    retry, dead letter, suppressed, failed, expired, stub, an operator's cancel, and what a
    report says after the relay's 250: bounced, complained, delayed) is written here,
    inside the caller's transaction: the delivery row (fenced by claim token), the attempt
    row, the dead letter, suppressions and the outcome event (outbox). Returns the delivery
    ids the fence let in (for ``late``: those given a new outcome by report ``report_id``)."""
    late_ids = await write_late(conn, late, report_id, suppression_ttl) if late else set()
    if not results:
        return late_ids
    try:
        rows = [convert.result_row(r, worker) for r in results]
        payload = json.dumps(rows, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, OverflowError) as exc:
        raise StoreRejected(f"record results: a result cannot be serialised: {exc}") from exc
    recorded = {row["delivery_id"] for row in await conn.fetch(q.RECORD_RESULTS, payload)}
    # One row per address: ON CONFLICT DO UPDATE may not touch a row twice in a statement,
    # and two mails to one dead address in a batch is the common case. The latest wins.
    suppress: dict[str, tuple[str, AttemptResult]] = {}
    for r in results:
        if r.delivery_id in recorded:
            for a in r.suppress:
                suppress[lookup_key(a).lower()] = (a, r)
    if suppress:
        await conn.execute(
            q.SUPPRESS_ADDRESSES,
            list(suppress),
            [convert.suppression_reason(a, r) for a, r in suppress.values()],
            [convert.rcpt_code(a, r) for a, r in suppress.values()],
            [r.delivery_id for _, r in suppress.values()],
            suppression_ttl,
        )
    return recorded | late_ids
