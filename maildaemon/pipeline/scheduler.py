"""Scheduler: claims due deliveries in batches and prepares them for the attempt workers.

A claim is one statement (``FOR UPDATE SKIP LOCKED``) that leases up to N deliveries. First
attempts are rendered here and the bytes pinned in one fenced statement per batch, so every
retry sends exactly those bytes. Intake wakes the scheduler (in-process, and LISTEN/NOTIFY
across replicas); otherwise it sleeps until the next due time or the poll interval.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime

from opentelemetry import trace

from maildaemon.config import Settings
from maildaemon.delivery import (
    AttemptResult,
    ClaimedDelivery,
    RecipientOutcome,
    RenderedPin,
)
from maildaemon.errors import RenderError, StoreUnavailable
from maildaemon.logs import event
from maildaemon.message.compose import Composer
from maildaemon.pipeline import endings
from maildaemon.pipeline.jobs import Job, JobQueue
from maildaemon.pipeline.lifecycle import Lifecycle, first_of, unavailable
from maildaemon.pipeline.results import ResultWriter, Trail
from maildaemon.pipeline.spans import describe_result
from maildaemon.retry import Backoff
from maildaemon.sending.destination import Destination
from maildaemon.store.pipeline.db import Store
from maildaemon.telemetry import Instruments
from maildaemon.tracing import log_ids, parent_context

log = logging.getLogger("maildaemon.scheduler")
_LOST_REFS_KEPT = 256
_OBSERVE_EVERY = 5.0  # seconds between backlog gauge refreshes


class Scheduler(Lifecycle):
    def __init__(
        self,
        settings: Settings,
        store: Store,
        composer: Composer,
        queue: JobQueue,
        results: ResultWriter,
        instruments: Instruments,
        worker_name: str,
        destination: Destination,
        tracer: trace.Tracer | None = None,
    ) -> None:
        super().__init__()
        self._s = settings
        self._tracer = tracer or trace.NoOpTracer()
        self._store = store
        self._composer = composer
        self._queue = queue
        self._results = results
        self._inst = instruments
        self._worker = worker_name
        self._dest = destination
        self.started = asyncio.Event()  # set once claiming begins
        # Claim in useful batches: wait for this many free slots unless workers starve.
        self._claim_size = max(1, min(settings.scheduler_batch_size, queue.slots // 2))
        self._observed_at = -_OBSERVE_EVERY
        # Claim statements that failed with PostgreSQL gone (bounded: past it, the lease's
        # expiry gives the deliveries back as before).
        self._lost_refs: collections.deque[str] = collections.deque(maxlen=_LOST_REFS_KEPT)

    async def run(self) -> None:
        event(
            log,
            "scheduler started",
            batch_size=self._s.scheduler_batch_size,
            poll_interval_s=self._s.scheduler_poll_interval,
            listen=self._s.listen_dsn is not None,
        )
        listener = asyncio.create_task(self._listen(), name="scheduler-listen")
        try:
            await self._loop()
        finally:
            self._stopping.set()  # the listener leaves by itself; cancel only if it hangs
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(listener), 5.0)
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        event(log, "scheduler stopped")

    async def _listen(self) -> None:
        """Keep a LISTEN connection for wake-ups from other replicas' intake; when it drops,
        poll meanwhile and listen again with backoff. Behind PgBouncer LISTEN needs a direct
        session (MAIL_POSTGRES_LISTEN_DSN); without one the scheduler only polls."""
        if self._s.listen_dsn is None:
            event(log, "scheduler polls only (PgBouncer, no MAIL_POSTGRES_LISTEN_DSN)")
            return
        direct = self._s.listen_dsn if self._s.postgres_listen_dsn is not None else None
        backoff = Backoff()
        lost_before = False
        while not self.stopping:
            error = "connection lost"
            try:
                async with self._store.listen("mail_due", self.wake, dsn=direct) as lost:
                    if lost_before:
                        event(log, "listen connection restored", component="scheduler")
                        self.wake()  # catch up on what was announced meanwhile
                    backoff.reset()
                    await first_of(lost, self._stopping)
            except StoreUnavailable as exc:
                error = str(exc)
            if self.stopping:
                return
            lost_before = True
            self._inst.store_unavailable.add(1, {"component": "listen"})
            event(
                log,
                "listen connection lost",
                logging.WARNING,
                component="scheduler",
                error=error,
                retry_in_s=backoff.peek(),
            )
            await self.sleep(backoff.next())

    async def _loop(self) -> None:
        self.started.set()
        backoff = Backoff()
        while not self.stopping:
            if not self._dest.up:  # claim nothing for a destination that is down
                await self._dest.wait_up(self._stopping)
                continue
            free = await self._queue.wait_for_slots(self._claim_size)
            if self.stopping or not self._queue.accepting:
                break
            self._wake.clear()
            try:
                await self._release_lost()
                claimed = await self._claim(min(free, self._s.scheduler_batch_size))
                backoff.reset()
            except StoreUnavailable as exc:
                wait = backoff.next()
                unavailable(log, self._inst, "scheduler", exc, wait)
                await self.sleep(wait)
                continue
            await self._observe_backlog()
            if claimed < min(free, self._s.scheduler_batch_size) and not self._wake.is_set():
                await self.sleep(await self._idle_for(), wakeable=True)

    async def _observe_backlog(self) -> None:
        """Refresh the backlog gauges (mail.attempt_schedule.*) every few seconds."""
        now = time.monotonic()
        if now - self._observed_at < _OBSERVE_EVERY:
            return
        self._observed_at = now
        try:
            depth, oldest, unreviewed = await self._store.schedule_depth()
        except StoreUnavailable:
            return
        self._inst.schedule_depth, self._inst.schedule_oldest_age_ms = depth, oldest
        self._inst.dead_letters_unreviewed = unreviewed

    async def _idle_for(self) -> float:
        """Sleep until the next delivery is due, at most one poll interval."""
        poll = self._s.scheduler_poll_interval
        try:
            nxt = await self._store.next_due_at()
        except StoreUnavailable:
            return poll
        if nxt is None:
            return poll
        return max(0.0, min(poll, (nxt - datetime.now(UTC)).total_seconds()))

    async def _release_lost(self) -> None:
        """Give back the leases of claim statements that failed with PostgreSQL gone: the
        statement may have committed with only its reply lost, and those deliveries would
        otherwise sit 'sending' until their lease ran out. Nothing of them reached a worker."""
        if not self._lost_refs:
            return
        released = await self._store.release_lost(self._lost_refs)
        self._lost_refs.clear()
        self._inst.lost_claims_released.add(released)
        if released:
            event(log, "lost claims released", logging.WARNING, released=released)

    async def _claim(self, limit: int) -> int:
        ref = uuid.uuid4().hex
        try:
            claims = await self._store.claim_due(limit, self._s.lease_duration, self._worker, ref)
            if not claims:
                return 0
            self._inst.claims.add(len(claims))
            try:
                jobs, finished = await self._prepare(claims)
            except StoreUnavailable:
                raise
            except Exception as exc:  # one claim's data broke the batch: find it, end only it
                jobs, finished = await self._prepare_apart(claims, exc)
        except StoreUnavailable:
            # Committed or not, none of this claim reached a worker: release it at reconnect.
            self._lost_refs.append(ref)
            raise
        self._queue.put(jobs)
        if finished:
            by_id = {c.delivery_id: c for c in claims}
            for result in finished:
                self._results.submit(result, self._ended(by_id[result.delivery_id], result))
        return len(claims)

    def _ended(self, claim: ClaimedDelivery, result: AttemptResult) -> Trail:
        """A delivery that ends before any send gets its own span in the producer's trace."""
        span = self._tracer.start_span(
            "delivery ended before sending",
            context=parent_context(claim.traceparent),
            attributes={"maildaemon.delivery_id": claim.delivery_id},
        )
        describe_result(span, result)
        span.end()
        return Trail(claim.envelope_recipients(), log_ids(span))

    async def _prepare(
        self, claims: list[ClaimedDelivery]
    ) -> tuple[list[Job], list[AttemptResult]]:
        """Expire, render and pin, check suppressions; return jobs and early endings."""
        now = datetime.now(UTC)
        finished: list[AttemptResult] = []
        ready: list[tuple[ClaimedDelivery, bytes]] = []
        pins: list[RenderedPin] = []
        live = []
        for claim in claims:
            ended = self._end_early(claim, now)
            if ended is not None:
                finished.append(ended)
            else:
                live.append(claim)
        # Rendering is CPU work that grows with what producers send (measured: a 256 KiB
        # notification body of short paragraphs takes seconds): in a thread, the loop keeps
        # serving SMTP sessions, intake and HTTP meanwhile.
        fresh = [c for c in live if c.rendered is None]
        # The suppression lookup runs while the thread renders.
        renders, suppressions = await asyncio.gather(
            asyncio.to_thread(self._render_all, fresh, now) if fresh else _nothing(),
            self._store.active_suppressions(a for c in live for a in c.envelope_recipients()),
        )
        for claim in live:
            message = claim.rendered
            if message is None:
                rendered = renders[claim.delivery_id]
                if isinstance(rendered, AttemptResult):
                    finished.append(rendered)
                    continue
                pins.append(rendered)
                message = rendered.rendered
            ready.append((claim, message))
        if pins:
            lost = await self._pin(pins)
            ready = [(c, m) for c, m in ready if c.delivery_id not in lost]
        jobs = self._jobs(ready, suppressions, finished, now)
        return jobs, finished

    async def _prepare_apart(
        self, claims: list[ClaimedDelivery], cause: Exception
    ) -> tuple[list[Job], list[AttemptResult]]:
        """Prepare each claim alone; one whose own preparation raises ends ``failed``
        (``unprocessable``) instead of stopping the scheduler on every replica. A store
        outage meanwhile still propagates (the claims' leases run out, as before)."""
        event(log, "claim batch fault", logging.WARNING, error=repr(cause), size=len(claims))
        jobs: list[Job] = []
        finished: list[AttemptResult] = []
        for claim in claims:
            try:
                one_jobs, one_finished = await self._prepare([claim])
            except StoreUnavailable:
                raise
            except Exception as exc:
                finished.append(self._poisoned(claim, "unprocessable", exc))
                continue
            jobs += one_jobs
            finished += one_finished
        return jobs, finished

    def _poisoned(self, claim: ClaimedDelivery, code: str, exc: Exception | str) -> AttemptResult:
        """End one delivery whose own data broke a step: ``failed`` with ``code``."""
        error = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self._inst.poison_ended.add(1, {"component": "scheduler", "failure_code": code})
        event(
            log,
            "delivery data unprocessable",
            logging.ERROR,
            delivery_id=claim.delivery_id,
            source=claim.source,
            failure_code=code,
            error=error[:500],
            exc_info=exc if isinstance(exc, Exception) else None,
        )
        return endings.unprocessable(claim, code, error, datetime.now(UTC))

    def _end_early(self, claim: ClaimedDelivery, now: datetime) -> AttemptResult | None:
        """A delivery that ends before rendering: unreadable, expired, or nothing to
        render from."""
        if claim.unreadable is not None:
            return self._poisoned(claim, "store_unreadable", claim.unreadable)
        if claim.expires_at is not None and claim.expires_at <= now:
            return endings.expired(claim, now)
        if claim.rendered is None and claim.command is None:  # never retried
            return endings.without_payload(claim, now)
        return None

    def _render_all(
        self, claims: list[ClaimedDelivery], now: datetime
    ) -> dict[str, RenderedPin | AttemptResult]:
        return {claim.delivery_id: self._render(claim, now) for claim in claims}

    def _render(self, claim: ClaimedDelivery, now: datetime) -> RenderedPin | AttemptResult:
        """Render a first attempt; a render fault ends the delivery `failed`."""
        assert claim.command is not None
        try:
            message_id, content_hash, message = self._composer.compose(
                claim.delivery_id, claim.command, now
            )
        except RenderError as exc:
            return endings.render_failed(claim, str(exc), now)
        except Exception as exc:  # a fault in one message (DKIM, a builder bug) is its own
            event(log, "render fault", logging.ERROR, delivery_id=claim.delivery_id, exc_info=exc)
            reason = f"cannot build the message: {type(exc).__name__}: {exc}"
            return endings.render_failed(claim, reason, now)
        locale = self._composer.locale_of(claim.command)
        return RenderedPin(
            claim.delivery_id, claim.claim_token, message_id, content_hash, message, locale
        )

    async def _pin(self, pins: list[RenderedPin]) -> set[str]:
        """Pin the rendered bytes (fenced); returns the deliveries whose lease was lost."""
        pinned = await self._store.pin_rendered(pins)
        lost = {p.delivery_id for p in pins} - pinned
        for delivery_id in lost:
            event(
                log,
                "attempt result fenced out",
                logging.WARNING,
                delivery_id=delivery_id,
                reason="lease lost before rendering was pinned",
            )
        return lost

    def _jobs(
        self,
        ready: list[tuple[ClaimedDelivery, bytes]],
        suppressions: dict[str, str],
        finished: list[AttemptResult],
        now: datetime,
    ) -> list[Job]:
        """Jobs for the workers; deliveries with nobody left to send to end here."""
        jobs: list[Job] = []
        for claim, message in ready:
            rcpts = claim.envelope_recipients()
            suppressed = {
                a: RecipientOutcome("suppressed", None, suppressions[a])
                for a in rcpts
                if a in suppressions
            }
            remaining = tuple(a for a in rcpts if a not in suppressed)
            if not remaining:
                finished.append(endings.all_suppressed(claim, suppressed, now))
            elif self._s.smtp_mode == "stub":
                finished.append(endings.stub_mode(claim, now))
            else:
                jobs.append(Job(claim, message, remaining, suppressed))
        return jobs


async def _nothing() -> dict[str, RenderedPin | AttemptResult]:
    return {}
