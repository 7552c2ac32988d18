"""Scheduler: claims due deliveries in batches and prepares them for the attempt workers.

A claim is one statement (``FOR UPDATE SKIP LOCKED``) that leases up to N deliveries. First
attempts are rendered here and the bytes pinned in one fenced statement per batch, so every
retry sends exactly those bytes. Intake wakes the scheduler (in-process, and LISTEN/NOTIFY
across replicas); otherwise it sleeps until the next due time or the poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

from maildaemon.compose import Composer
from maildaemon.config import Settings
from maildaemon.errors import RenderError, StoreUnavailable
from maildaemon.logs import event
from maildaemon.models import (
    AttemptResult,
    ClaimedDelivery,
    DeliveryStatus,
    RecipientOutcome,
    RenderedPin,
)
from maildaemon.outcomes import without_attempt
from maildaemon.results import ResultWriter
from maildaemon.store.db import Store
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.scheduler")
_OBSERVE_EVERY = 5.0  # seconds between backlog gauge refreshes


@dataclass(frozen=True, slots=True)
class Job:
    """One delivery ready to send: the pinned bytes and who still needs them."""

    claim: ClaimedDelivery
    message: bytes
    recipients: tuple[str, ...]
    suppressed: dict[str, RecipientOutcome]


class JobQueue:
    """Claimed jobs waiting for a worker; bounded by the number of open slots.

    A slot is taken when a job is claimed and given back when its result is committed,
    so claims never run ahead of what the workers and the writer can absorb.
    """

    def __init__(self, slots: int) -> None:
        self._jobs: deque[Job | None] = deque()
        self._has_jobs = asyncio.Event()
        self._has_space = asyncio.Event()
        self._has_space.set()
        self._free = slots
        self.slots = slots

    async def wait_for_slots(self, enough: int) -> int:
        """Wait until ``enough`` slots are free, or any slot while the workers starve."""
        while self._free <= 0 or (self._free < enough and self._jobs):
            self._has_space.clear()
            await self._has_space.wait()
        return self._free

    def put(self, jobs: list[Job]) -> None:
        self._free -= len(jobs)
        self._jobs.extend(jobs)
        if self._jobs:
            self._has_jobs.set()

    async def get(self) -> Job | None:
        while not self._jobs:
            self._has_jobs.clear()
            await self._has_jobs.wait()
        return self._jobs.popleft()

    def release(self) -> None:
        """A job is finished with (its result committed): its slot is free again."""
        self._free += 1
        self._has_space.set()

    def release_after(self, _: asyncio.Future[bool]) -> None:
        self.release()

    def close(self, workers: int) -> list[Job]:
        """Take back every job not yet started and tell each worker to stop."""
        left = [j for j in self._jobs if j is not None]
        self._jobs.clear()
        self._jobs.extend([None] * workers)
        self._has_jobs.set()
        return left


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        composer: Composer,
        queue: JobQueue,
        results: ResultWriter,
        instruments: Instruments,
        worker_name: str,
    ) -> None:
        self._s = settings
        self._store = store
        self._composer = composer
        self._queue = queue
        self._results = results
        self._inst = instruments
        self._worker = worker_name
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        # Claim in useful batches: wait for this many free slots unless workers starve.
        self._claim_size = max(1, min(settings.scheduler_batch_size, queue.slots // 2))
        self._observed_at = -_OBSERVE_EVERY

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        event(
            log,
            "scheduler started",
            batch_size=self._s.scheduler_batch_size,
            poll_interval_s=self._s.scheduler_poll_interval,
        )
        try:
            async with self._store.listen("mail_due", self.wake):
                await self._loop()
        except StoreUnavailable:
            # LISTEN needs a connection; without one, poll until PostgreSQL is back.
            await self._loop()
        event(log, "scheduler stopped")

    async def _loop(self) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            free = await self._queue.wait_for_slots(self._claim_size)
            if self._stopping.is_set():
                break
            self._wake.clear()
            try:
                claimed = await self._claim(min(free, self._s.scheduler_batch_size))
                delay = 0.1
            except StoreUnavailable as exc:
                self._inst.store_unavailable.add(1, {"component": "scheduler"})
                event(
                    log,
                    "postgres unavailable",
                    logging.WARNING,
                    error=str(exc),
                    component="scheduler",
                    retry_in_s=delay,
                )
                await self._sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            await self._observe_backlog()
            if claimed < min(free, self._s.scheduler_batch_size):
                await self._sleep(await self._idle_for())

    async def _observe_backlog(self) -> None:
        """Refresh the backlog gauges (mail.attempt_schedule.*) every few seconds."""
        now = time.monotonic()
        if now - self._observed_at < _OBSERVE_EVERY:
            return
        self._observed_at = now
        try:
            depth, oldest = await self._store.schedule_depth()
        except StoreUnavailable:
            return
        self._inst.schedule_depth, self._inst.schedule_oldest_age_ms = depth, oldest

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

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _claim(self, limit: int) -> int:
        claims = await self._store.claim_due(limit, self._s.lease_duration, self._worker)
        if not claims:
            return 0
        self._inst.claims.add(len(claims))
        jobs, finished = await self._prepare(claims)
        self._queue.put(jobs)
        if finished:
            for result in finished:
                self._results.submit(result)
        return len(claims)

    async def _prepare(
        self, claims: list[ClaimedDelivery]
    ) -> tuple[list[Job], list[AttemptResult]]:
        """Expire, render and pin, check suppressions; return jobs and early endings."""
        now = datetime.now(UTC)
        finished: list[AttemptResult] = []
        ready: list[tuple[ClaimedDelivery, bytes]] = []
        pins: list[RenderedPin] = []
        for claim in claims:
            if claim.expires_at is not None and claim.expires_at <= now:
                finished.append(
                    without_attempt(
                        claim, "expired", "expires_at passed before the attempt", now, "expired"
                    )
                )
                continue
            message = claim.rendered
            if message is None:
                if claim.command is None:  # nothing to render from: never retried
                    finished.append(
                        without_attempt(
                            claim,
                            "failed",
                            "the delivery has no stored payload",
                            now,
                            "failed",
                            record_attempt=True,
                        )
                    )
                    continue
                try:
                    message_id, content_hash, message = self._composer.compose(
                        claim.delivery_id, claim.command, now
                    )
                except RenderError as exc:
                    finished.append(
                        without_attempt(
                            claim, "failed", str(exc), now, "failed", record_attempt=True
                        )
                    )
                    continue
                pins.append(
                    RenderedPin(
                        claim.delivery_id, claim.claim_token, message_id, content_hash, message
                    )
                )
            ready.append((claim, message))
        if pins:
            pinned = await self._store.pin_rendered(pins)
            fresh = {p.delivery_id for p in pins}
            lost = fresh - pinned
            if lost:
                for delivery_id in lost:
                    event(
                        log,
                        "attempt result fenced out",
                        logging.WARNING,
                        delivery_id=delivery_id,
                        reason="lease lost before rendering was pinned",
                    )
                ready = [(c, m) for c, m in ready if c.delivery_id not in lost]
        suppressions = await self._store.active_suppressions(
            a for c, _ in ready for a in c.envelope_recipients()
        )
        jobs: list[Job] = []
        for claim, message in ready:
            rcpts = claim.envelope_recipients()
            suppressed = {
                a: RecipientOutcome("suppressed", None, suppressions[a.lower()])
                for a in rcpts
                if a.lower() in suppressions
            }
            remaining = tuple(a for a in rcpts if a not in suppressed)
            if not remaining:
                status: DeliveryStatus = "sent" if claim.rcpts_accepted else "suppressed"
                finished.append(
                    without_attempt(
                        claim,
                        status,
                        "every remaining recipient is on the suppression list",
                        now,
                        "suppressed",
                        recipients=suppressed,
                    )
                )
            elif self._s.smtp_mode == "stub":
                finished.append(
                    without_attempt(
                        claim,
                        "suppressed",
                        "stub mode (MAIL_SMTP_MODE=stub): rendered, not sent",
                        now,
                        "suppressed",
                    )
                )
            else:
                jobs.append(Job(claim, message, remaining, suppressed))
        return jobs, finished
