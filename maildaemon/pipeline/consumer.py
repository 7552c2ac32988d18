"""Stream consumer: delivery commands from the Redis Stream into PostgreSQL, exactly once.

A consumer group holds the persisted offset. Each batch (read by ``stream_reader`` with a
bound on its bytes) is validated, written in one PostgreSQL transaction, and only then
XACKed. Entries left pending by a consumer that died are taken over with XAUTOCLAIM once
idle long enough. While PostgreSQL is down the consumer stops reading and retries with
backoff; nothing is acked meanwhile. Whatever one entry does -- any exception while it is
validated, hashed, serialised or refused by PostgreSQL -- it ends as a malformed record and
the rest of its batch is taken in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from redis.exceptions import ResponseError

from maildaemon.config import Settings
from maildaemon.contract.command import CommandPolicy, DeliveryCommand, Rejection
from maildaemon.contract.parsing import parse_entry, raw_entry_text
from maildaemon.delivery import IntakeEntry, IntakeResult
from maildaemon.errors import StoreRejected, StoreUnavailable
from maildaemon.logs import event
from maildaemon.pipeline.lifecycle import (
    REDIS_DOWN,
    Lifecycle,
    RedisClient,
    redis_moving,
    unavailable,
)
from maildaemon.pipeline.spans import command_spans
from maildaemon.pipeline.stream_reader import BoundedBatch, BoundedReader, EntryCounter
from maildaemon.pipeline.stream_wakeup import StreamWakeup
from maildaemon.retry import Backoff
from maildaemon.store.pipeline.db import RETRYABLE, Store
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.consumer")

RAW_CAP = 64 * 1024  # characters of a malformed entry kept in its record
IDLE_POLL_MAX = 0.05  # seconds between polls of an idle stream, at most
BUSY_AFTER = 3  # batches in a row after which the consumer stops asking to be woken
OBSERVE_EVERY = 5.0  # seconds between consumer lag observations (XINFO GROUPS)
# Redis < 7 has no `lag`: undelivered entries are counted inside Redis, up to this many
# entries or bytes (the lag alert fires at 1,000).
LAG_SCAN_CAP = 10_000
LAG_SCAN_BYTES = 8 * 1024 * 1024


def entry_id_text(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def to_intake(entry_id: str, fields: dict[bytes, bytes], policy: CommandPolicy) -> IntakeEntry:
    """Validate one stream entry into what the store takes in; never raises."""
    try:
        parsed = parse_entry(fields, policy)
    except Exception as exc:  # parse_entry should not raise; if it does, it is one record
        event(log, "intake entry failed", logging.ERROR, stream_entry_id=entry_id, error=repr(exc))
        parsed = Rejection("intake_error", f"{type(exc).__name__}: {exc}"[:500])
    if isinstance(parsed, DeliveryCommand):
        return IntakeEntry(entry_id, parsed, None, "")
    try:
        raw, truncated = raw_entry_text(fields, RAW_CAP)
    except Exception:
        raw, truncated = "", True
    return IntakeEntry(entry_id, None, parsed, raw, truncated)


def _refused(entry: IntakeEntry, detail: str, keep_raw: bool = True) -> IntakeEntry:
    """The malformed record for an entry whose data PostgreSQL would not store.

    Without ``keep_raw`` the record holds nothing the producer sent: only ASCII text of
    ours, which PostgreSQL cannot refuse for its content.
    """
    cmd = entry.command
    raw = ""
    if keep_raw:
        try:
            raw = entry.raw or (cmd.canonical_json() if cmd is not None else "")
        except Exception:
            raw = ""
    rejection = Rejection(
        "invalid_field",
        detail[:1000] if keep_raw else ascii(detail)[:1000],
        cmd.delivery_id if cmd and keep_raw else None,
        cmd.source if cmd and keep_raw else None,
    )
    return IntakeEntry(entry.stream_entry_id, None, rejection, raw[:RAW_CAP], not keep_raw)


class StreamConsumer(Lifecycle):
    """Reads the command stream through a consumer group until told to stop."""

    def __init__(
        self,
        settings: Settings,
        redis: RedisClient,
        store: Store,
        policy: CommandPolicy,
        instruments: Instruments,
        on_committed: Callable[[], None],
        tracer: trace.Tracer | None = None,
    ) -> None:
        super().__init__()
        self._s = settings
        self._tracer = tracer or trace.NoOpTracer()
        self._observed_at = -OBSERVE_EVERY
        self._redis = redis
        self._store = store
        self._policy = policy
        self._inst = instruments
        self._on_committed = on_committed
        self.started = asyncio.Event()  # set once the group exists and reading begins
        self._last_reclaim = 0.0
        self._lag_counter = EntryCounter(
            redis, settings.command_stream, cap=LAG_SCAN_CAP, byte_cap=LAG_SCAN_BYTES
        )
        self._wakeup = StreamWakeup(settings, redis, instruments, self.wake)
        self._reader = BoundedReader(
            redis,
            settings.command_stream,
            settings.consumer_group,
            settings.consumer_name,
            max_count=settings.consumer_batch_size,
            budget=settings.consumer_batch_max_bytes,
            max_entry=settings.command_max_bytes,
        )

    async def ensure_group(self) -> None:
        """Create the consumer group on first start, reading from the start of the stream."""
        try:
            await self._redis.xgroup_create(
                self._s.command_stream, self._s.consumer_group, id="0", mkstream=True
            )
            event(
                log,
                "consumer group created",
                stream=self._s.command_stream,
                group=self._s.consumer_group,
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        s = self._s
        await self.ensure_group()
        self.started.set()
        event(
            log,
            "command consumer started",
            stream=s.command_stream,
            group=s.consumer_group,
            consumer=s.consumer_name,
            batch_size=s.consumer_batch_size,
            batch_max_bytes=s.consumer_batch_max_bytes,
        )
        wakeup = asyncio.create_task(self._wakeup.run(), name="consumer-wakeup")
        try:
            await self._consume()
        finally:
            self._wakeup.stop()
            await asyncio.gather(wakeup, return_exceptions=True)
        event(log, "command consumer stopped", consumer=s.consumer_name)

    async def _consume(self) -> None:
        s = self._s
        backoff = Backoff()
        idle = 0.0
        busy = 0  # batches in a row: past BUSY_AFTER, no wake-up is wanted
        while not self.stopping:
            try:
                batch = await self._read()
                await self._observe_lag()
                backoff.reset()
                busy = busy + 1 if batch else 0
                self._wakeup.want(busy < BUSY_AFTER)
                if batch:
                    idle = 0.0
                    await self._take_in(batch)
                elif self._wakeup.active:  # an XADD wakes us: sleep until then
                    await self.sleep(s.consumer_block, wakeable=True)
                else:
                    idle = min(max(idle * 2, 0.002), s.consumer_block, IDLE_POLL_MAX)
                    await self.sleep(idle, wakeable=True)
            except ResponseError as exc:
                if redis_moving(exc):
                    # A failover (a demoted master behind a fixed address, a Cluster slot
                    # between masters): wait for the new master.
                    await self._redis_unavailable(exc, backoff)
                    continue
                if "NOGROUP" not in str(exc):
                    raise
                # The stream or its group was deleted under us: create them again.
                event(
                    log,
                    "consumer group missing, recreating",
                    logging.WARNING,
                    stream=s.command_stream,
                    group=s.consumer_group,
                )
                await self.ensure_group()
            except REDIS_DOWN as exc:
                await self._redis_unavailable(exc, backoff)

    async def _redis_unavailable(self, exc: Exception, backoff: Backoff) -> None:
        wait = backoff.next()
        unavailable(log, self._inst, "consumer", exc, wait)
        await self.sleep(wait)

    async def _read(self) -> BoundedBatch:
        """One bounded batch; every so often it also takes over entries of dead consumers."""
        now = time.monotonic()
        reclaim_idle_ms: int | None = None
        if now - self._last_reclaim >= max(self._s.consumer_reclaim_idle / 2, 0.5):
            self._last_reclaim = now
            reclaim_idle_ms = int(self._s.consumer_reclaim_idle * 1000)
        batch = await self._reader.read(reclaim_idle_ms)
        if reclaim_idle_ms is None:
            return batch
        if batch.reclaimed:
            event(
                log,
                "pending commands reclaimed",
                logging.WARNING,
                count=batch.reclaimed,
                consumer=self._s.consumer_name,
            )
        else:
            await self._forget_departed()
        return batch

    async def _forget_departed(self) -> None:
        """Remove consumers of replicas long gone (nothing pending, idle for long) from the
        group, so that XINFO stays readable as replicas come and go."""
        forget_ms = int(self._s.consumer_forget_idle * 1000)
        for info in await self._redis.xinfo_consumers(
            self._s.command_stream, self._s.consumer_group
        ):
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            if name != self._s.consumer_name and info["pending"] == 0 and info["idle"] >= forget_ms:
                await self._redis.xgroup_delconsumer(
                    self._s.command_stream, self._s.consumer_group, name
                )
                event(log, "departed consumer removed", consumer=name, idle_ms=info["idle"])

    async def _observe_lag(self) -> None:
        """Refresh the consumer lag gauges (mail.stream.consumer_*) every few seconds."""
        now = time.monotonic()
        if now - self._observed_at < OBSERVE_EVERY:
            return
        self._observed_at = now
        try:
            observed = await self._read_lag()
        except REDIS_DOWN:  # a gauge is never worth stopping intake (e.g. stream deleted)
            return
        if observed is not None:
            self._inst.consumer_lag, self._inst.consumer_pending = observed

    async def _read_lag(self) -> tuple[int, int] | None:
        """(lag, pending) of our group: XINFO GROUPS, and on Redis < 7 a bounded count."""
        s = self._s
        groups = await self._redis.xinfo_groups(s.command_stream)
        names = (s.consumer_group, s.consumer_group.encode())
        group = next((g for g in groups if g["name"] in names), None)
        if group is None:
            return None
        lag = group.get("lag")
        if lag is None:  # Redis < 7, or a lag Redis cannot tell: count, bounded
            lag = await self._lag_counter.after(group["last-delivered-id"])
        return int(lag), int(group["pending"])

    async def _take_in(self, batch: BoundedBatch) -> None:
        started = time.perf_counter()
        started_ns = time.time_ns()
        with self._tracer.start_as_current_span(
            "intake batch",
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "redis",
                "messaging.destination.name": self._s.command_stream,
                "messaging.batch.message_count": len(batch.entries) + len(batch.oversize),
            },
        ) as span:
            entries = [
                to_intake(entry_id_text(eid), fields, self._policy) for eid, fields in batch.entries
            ]
            entries.extend(self._oversize(eid, size) for eid, size in batch.oversize)
            result = await self._commit(entries) if entries else IntakeResult()
            if result is None:  # stopping while PostgreSQL is down: leave them pending
                return
            if result.created:  # durable now: the scheduler may claim them during the XACK
                self._on_committed()
            # Only now, with the batch committed, may the entries leave the pending list.
            # (Gone entries were trimmed from the stream before anyone took them in.)
            ids = [eid for eid, _ in batch.entries] + [eid for eid, _ in batch.oversize]
            await self._redis.xack(
                self._s.command_stream, self._s.consumer_group, *ids, *batch.gone
            )
            self._report(result)
            if span.get_span_context().is_valid:  # a tracer, not the no-op one
                command_spans(self._tracer, result, span, started_ns)
        self._inst.intake_batch_duration_ms.record((time.perf_counter() - started) * 1000)

    def _oversize(self, entry_id: bytes, size: int) -> IntakeEntry:
        """The record of an entry too large to read: its text never left Redis."""
        limit = self._s.command_max_bytes
        rejection = Rejection("too_large", f"stream entry is {size} bytes, the limit is {limit}")
        return IntakeEntry(entry_id_text(entry_id), None, rejection, "", True)

    async def _commit(self, entries: list[IntakeEntry]) -> IntakeResult | None:
        backoff = Backoff()
        conflicts = 0
        refusals = 0
        while True:
            try:
                return await self._store.ingest(entries, self._s.idempotency_window)
            except StoreUnavailable as exc:
                unavailable(log, self._inst, "consumer", exc, backoff.peek(), pending=len(entries))
            except StoreRejected as exc:
                # One entry's data is refused by PostgreSQL: find it, record it as malformed.
                if len(entries) > 1:
                    return await self._commit_one_by_one(entries)
                entry = entries[0]
                refusals += 1
                event(
                    log,
                    "intake refused by postgres",
                    logging.ERROR,
                    error=str(exc),
                    stream_entry_id=entry.stream_entry_id,
                    refusals=refusals,
                )
                if refusals <= 2:
                    # First the entry as a record with its text, then a bare record of ours.
                    entries = [_refused(entry, str(exc), keep_raw=refusals == 1)]
                    continue
                # Even a bare record is refused: the database, not the entry, is at fault.
                self._inst.store_unavailable.add(1, {"component": "consumer"})
            except RETRYABLE as exc:
                # A concurrent replica raced us on the same keys; try the batch again.
                conflicts += 1
                event(
                    log,
                    "intake conflict, retrying",
                    logging.INFO,
                    error=repr(exc),
                    attempt=conflicts,
                )
                if conflicts >= 3 and len(entries) > 1:
                    return await self._commit_one_by_one(entries)
            if self.stopping:
                return None
            await self.sleep(backoff.next())

    async def _commit_one_by_one(self, entries: list[IntakeEntry]) -> IntakeResult | None:
        total = IntakeResult()
        for entry in entries:
            part = await self._commit([entry])
            if part is None:
                return None
            total.created.extend(part.created)
            total.replays.extend(part.replays)
            total.rejected.extend(part.rejected)
        return total

    def _report(self, result: IntakeResult) -> None:
        inst = self._inst
        if result.created:
            inst.stream_commands.add(len(result.created), {"result": "accepted"})
        if result.replays:
            inst.stream_commands.add(len(result.replays), {"result": "replay"})
            for entry, delivery_id in result.replays:
                event(
                    log,
                    "stream command replayed",
                    stream_entry_id=entry.stream_entry_id,
                    delivery_id=delivery_id,
                )
        for entry, rejection in result.rejected:
            inst.stream_commands.add(1, {"result": "malformed"})
            inst.stream_commands_malformed.add(1, {"failure_code": rejection.failure_code})
            event(
                log,
                "stream command rejected",
                logging.WARNING,
                stream_entry_id=entry.stream_entry_id,
                failure_code=rejection.failure_code,
                failure_detail=rejection.failure_detail,
                delivery_id=rejection.delivery_id,
                source=rejection.source,
            )
        if log.isEnabledFor(logging.DEBUG):
            for entry in result.created:
                assert entry.command is not None
                event(
                    log,
                    "delivery accepted",
                    logging.DEBUG,
                    stream_entry_id=entry.stream_entry_id,
                    delivery_id=entry.command.delivery_id,
                    source=entry.command.source,
                )
