"""Attempt worker pool: each worker owns one kept-open SMTP connection and sends jobs.

Workers take prepared jobs from the scheduler's queue, send them, classify the outcome and
hand the result to the result writer, which commits it whatever happens to the worker
(the job's queue slot frees up only once its result is durable). A worker does not wait
for each commit: it goes on sending while at most ``MAIL_RESULT_WINDOW`` of its accepted
messages have results not yet committed, which is what one crash can leave unrecorded
(and send again, flagged ``possible_duplicate``) per connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import time
from collections import deque
from datetime import UTC, datetime

from opentelemetry import trace

from maildaemon.config import Settings
from maildaemon.delivery import AttemptResult
from maildaemon.errors import (
    MessageTooLarge,
    NotBegun,
    TransientTransportError,
    TransportError,
    TransportTimeout,
    UnknownOutcome,
)
from maildaemon.logs import event
from maildaemon.pipeline.jobs import Job, JobQueue
from maildaemon.pipeline.results import ResultWriter, Trail
from maildaemon.pipeline.spans import SmtpPhases, attempt_span, describe_result, transaction_span
from maildaemon.retry import RetryPolicy
from maildaemon.returnpath import from_settings as return_path_of
from maildaemon.sending.destination import Destination, is_unreachable
from maildaemon.sending.outcomes import from_error, from_report
from maildaemon.sending.pipelined import Envelope, PipeliningConnection
from maildaemon.sending.ratelimit import RateLimiter
from maildaemon.sending.reply import SendReport
from maildaemon.telemetry import Instruments
from maildaemon.tracing import log_ids

log = logging.getLogger("maildaemon.worker")


class AttemptWorker:
    def __init__(
        self,
        index: int,
        settings: Settings,
        context: ssl.SSLContext,
        sender: str,
        queue: JobQueue,
        results: ResultWriter,
        policy: RetryPolicy,
        limiter: RateLimiter,
        instruments: Instruments,
        destination: Destination,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.index = index
        self._s = settings
        self._tracer = tracer or trace.NoOpTracer()
        self._phases = SmtpPhases(self._tracer)
        self._conn = PipeliningConnection(settings, context, lambda: queue.accepting)
        self._conn.phase = self._phases
        self._sender = sender
        self._return_path = return_path_of(settings)
        self._queue = queue
        self._results = results
        self._policy = policy
        self._limiter = limiter
        self._inst = instruments
        self._dest = destination
        self._unrecorded: deque[asyncio.Future[bool]] = deque()  # results not yet committed
        # The job whose envelope the connection sent behind the previous message's data:
        # this worker sends it next. (Not with rate limits: their wait comes before MAIL.)
        self._ahead: Job | None = None
        if not limiter.enabled:
            self._conn.lookahead = self._take_next

    async def run(self) -> None:
        try:
            while True:
                job, self._ahead = self._ahead or await self._queue.get(), None
                if job is None:
                    return
                if not self._dest.up:  # held, not charged: the probe gives the claim back
                    self._queue.give_back(job)
                    await self._dest.wait_up(self._queue.stopped)
                    continue
                try:
                    with attempt_span(self._tracer, job.claim) as span:
                        result = await self.attempt(job)
                        describe_result(span, result)
                except NotBegun:
                    self._queue.give_back(job)  # nothing sent: the claim goes back
                    continue
                except BaseException:
                    self._queue.release()
                    if self._ahead is not None:
                        self._queue.give_back(self._ahead)
                        self._ahead = None
                    raise
                # The slot frees up when the result is committed, not before; and this
                # worker begins no other transaction while MAIL_RESULT_WINDOW of its results
                # are uncommitted, so a crash leaves at most that many accepted-but-
                # unrecorded messages per connection.
                trail = Trail(job.claim.envelope_recipients(), log_ids(span))
                recorded = self._results.submit(result, trail)
                recorded.add_done_callback(self._queue.release_after)
                await self._within_window(recorded)
        finally:
            await asyncio.shield(self._conn.close())

    def _envelope(self, job: Job) -> Envelope:
        """The job's envelope: with MAIL_BOUNCE_DOMAIN, its own signed sender, and its
        token as the DSN envelope id; else the one configured sender, no DSN asked for."""
        if self._return_path is None:
            return self._sender, job.recipients, job.message, None
        delivery_id = job.claim.delivery_id
        sender = self._return_path.sender(delivery_id)
        return sender, job.recipients, job.message, self._return_path.token(delivery_id)

    def _take_next(self) -> Envelope | None:
        """Take the next job now, for its envelope to go behind this message's data."""
        if self._ahead is not None or not self._dest.up:
            return None
        job = self._queue.get_nowait()
        if job is None:
            return None
        self._ahead = job
        return self._envelope(job)

    async def _within_window(self, recorded: asyncio.Future[bool]) -> None:
        """Keep ``recorded`` among this worker's uncommitted results; wait (shielded: the
        writer commits whatever happens to us) until fewer than the window remain."""
        pending = self._unrecorded
        pending.append(recorded)
        while pending and pending[0].done():
            pending.popleft()
        while len(pending) >= self._s.result_window:
            await asyncio.shield(pending.popleft())
            while pending and pending[0].done():
                pending.popleft()

    async def attempt(self, job: Job) -> AttemptResult:
        """Send one job; raises NotBegun when no SMTP transaction was begun for it."""
        claim = job.claim
        await self._limiter.acquire(job.recipients)
        if not self._queue.accepting:
            raise NotBegun("stopping: no new SMTP transaction begins")
        started = datetime.now(UTC)
        started_ns = self._phases.begin()
        try:
            async with asyncio.timeout(self._s.smtp_timeout):
                report = await self._conn.send(*self._envelope(job))
        except TimeoutError:
            in_data = self._conn.in_data
            self._conn.abort()
            stage = self._conn.stage
            exc: TransportError = (
                UnknownOutcome(
                    "MAIL_SMTP_TIMEOUT reached during DATA, before the reply", stage=stage
                )
                if in_data
                else TransportTimeout(f"MAIL_SMTP_TIMEOUT reached at {stage}", stage=stage)
            )
            transaction_span(self._tracer, started_ns, self._phases, None, exc)
            self._held_if_known_down(exc)
            return self._failed(job, exc, started)
        except NotBegun:
            raise
        except TransportError as exc:
            transaction_span(self._tracer, started_ns, self._phases, None, exc)
            self._held_if_known_down(exc)
            return self._failed(job, exc, started)
        except Exception as exc:  # a reply or message that breaks the client: this job's own
            return self._faulted(job, exc, started)
        finished = datetime.now(UTC)
        transaction_span(self._tracer, started_ns, self._phases, report, None)
        self._inst.send_duration_ms.record(report.duration_ms)
        self._accepted(job, report)
        self._limiter.observe(report)
        try:
            return from_report(
                claim, job.recipients, report, self._policy, started, finished, job.suppressed
            )
        except Exception as exc:  # the data went out: whatever the fault, "unknown"
            return self._faulted(job, exc, started, in_data=True)

    def _accepted(self, job: Job, report: SendReport) -> None:
        """End-to-end latency: the command's XADD time to the server's acceptance."""
        enqueued = job.claim.enqueued_ms()
        if report.data_reply is not None and enqueued is not None:
            self._inst.end_to_end_latency_ms.record(max(0, time.time_ns() // 1_000_000 - enqueued))

    def _faulted(
        self, job: Job, fault: Exception, started: datetime, in_data: bool | None = None
    ) -> AttemptResult:
        """An unexpected error inside one send ends that attempt, never the worker: the
        connection is dropped (its state is unknown) and the attempt is retried on the
        ladder like a lost link — ``unknown`` once the data may have gone out."""
        stage = self._conn.stage
        if in_data is None:
            in_data = self._conn.in_data
        self._conn.abort()
        what = f"{type(fault).__name__}: {fault}"[:300]
        exc: TransportError = (
            UnknownOutcome(f"unexpected fault during DATA: {what}", stage=stage)
            if in_data
            else TransientTransportError(f"unexpected fault at {stage}: {what}", stage=stage)
        )
        self._inst.poison_ended.add(1, {"component": "worker", "failure_code": "attempt_fault"})
        event(
            log,
            "smtp attempt fault",
            logging.ERROR,
            delivery_id=job.claim.delivery_id,
            source=job.claim.source,
            attempt=job.claim.attempt_no,
            failure_code="attempt_fault",
            stage=stage,
            exc_info=fault,
        )
        result = self._failed(job, exc, started)
        return dataclasses.replace(result, failure_code="attempt_fault")

    def _held_if_known_down(self, exc: TransportError) -> None:
        """A session that could not open after another connection already found the
        destination down says nothing new: the claim goes back without an attempt (as it
        would had this worker seen the state first). Only the failure that turns the
        destination down is charged, so an outage costs at most one attempt per connection
        (the transaction in flight when the link broke) and that one."""
        if is_unreachable(exc) and not self._dest.up:
            self._conn.abort()
            raise NotBegun(f"destination already down: {exc}")

    def _failed(self, job: Job, exc: TransportError, started: datetime) -> AttemptResult:
        finished = datetime.now(UTC)
        if is_unreachable(exc):
            self._dest.mark_down(exc)
        self._inst.send_duration_ms.record((finished - started).total_seconds() * 1000)
        event(
            log,
            "smtp attempt failed",
            logging.WARNING,
            delivery_id=job.claim.delivery_id,
            source=job.claim.source,
            attempt=job.claim.attempt_no,
            error_class=type(exc).__name__,
            error=str(exc),
            stage=exc.stage,
            reply_code=exc.code,
            reply_text=exc.text,
        )
        if isinstance(exc, MessageTooLarge):
            self._inst.messages_too_large.add(1)
            event(
                log,
                "smtp message too large",
                logging.WARNING,
                delivery_id=job.claim.delivery_id,
                source=job.claim.source,
                attempt=job.claim.attempt_no,
                failure_code=exc.failure_code,
                size_octets=exc.size,
                limit_octets=exc.limit,
            )
        return from_error(job.claim, job.recipients, exc, self._policy, started, finished)
