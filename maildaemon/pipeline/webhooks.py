"""Webhook dispatcher: the per-endpoint queues (filled from the outbox by the event
publisher's transaction, ``store.webhooks.db.fan_out``) delivered to their endpoints.

Each pass claims due rows (one statement; a lease and a fence token; only the oldest row
of a delivery per endpoint, so a delivery's events arrive in order; at most
``MAIL_WEBHOOK_CONCURRENCY`` in flight per endpoint across replicas) and starts one task
per claim: a slow or failing endpoint holds only its own slots, never another endpoint's,
the event stream or mail delivery. Each result is written as it comes (an attempt row; the
row leaves the queue or waits for its next try on ``MAIL_WEBHOOK_RETRY_LADDER`` with
jitter). An event that fails the whole schedule disables its endpoint (log line, metric,
alert); its backlog stays for enable or replay. A process killed mid-attempt leaves a
lease that expires: the event is sent again, with the same ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from maildaemon.config import Settings
from maildaemon.errors import MailDaemonError
from maildaemon.logs import event
from maildaemon.pipeline.lifecycle import DEPENDENCY_DOWN, Periodic
from maildaemon.store.webhooks.db import WebhookStore
from maildaemon.store.webhooks.records import Claim, Outcome
from maildaemon.telemetry import Instruments
from maildaemon.webhooks import signing
from maildaemon.webhooks.client import EndpointClient, Reply

log = logging.getLogger("maildaemon.webhooks")
FIGURES_EVERY = 5.0  # seconds between two backlog readings
HOLD_MAX = 60.0  # seconds an endpoint is held at most after a failure
COALESCE = 0.005  # seconds: the shortest time between two passes a wake-up can start


class WebhookDispatcher(Periodic):
    component = "webhooks"
    wakeable = True

    def __init__(self, settings: Settings, store: WebhookStore, instruments: Instruments) -> None:
        super().__init__(log, instruments, settings.webhook_poll_interval)
        self._s = settings
        self._store = store
        self._clients: dict[int, EndpointClient] = {}
        self._retired: list[EndpointClient] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._results: list[Outcome] = []  # finished attempts not yet written
        self._figures_at = 0.0
        self._last_pass = -COALESCE
        # Endpoints that just failed (no answer, or 5xx): not claimed for until the time
        # here, so a receiver that is down gets a few probes, not every waiting event.
        self._held: dict[int, float] = {}
        self._rng = random.Random()

    def started(self) -> None:
        s = self._s
        event(
            log,
            "webhook dispatcher started",
            concurrency=s.webhook_concurrency,
            attempts=len(s.webhook_retry_ladder) + 1,
            schedule_s=round(sum(s.webhook_retry_ladder)),
        )

    async def tick(self) -> float:
        early = self._last_pass + COALESCE - time.monotonic()
        if early > 0:  # woken again right after a pass: let more results join this one
            await self.sleep(early)
        self._last_pass = time.monotonic()
        await self._flush()  # results first: they free slots and a delivery's next event
        if time.monotonic() - self._figures_at >= FIGURES_EVERY:
            await self._figures()
        now = time.monotonic()
        self._held = {e: until for e, until in self._held.items() if until > now}
        claims = await self._store.claim(
            self._s.webhook_concurrency,
            self._s.webhook_batch_size,
            self._s.webhook_lease,
            list(self._held),
        )
        if any(c.endpoint_id not in self._inst.webhooks.backlog for c in claims):
            self._figures_at = 0.0  # a new endpoint: its gauges from the next pass on
        for claim in claims:
            task = asyncio.ensure_future(self._deliver(claim))
            self._inflight.add(task)
            task.add_done_callback(self._done)
        return 0.0 if len(claims) >= self._s.webhook_batch_size else self.interval

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()  # its lease runs out: the event is sent again
            event(log, "webhook attempt crashed", logging.WARNING, error=repr(exc))
        self.wake()  # a slot is free, and a delivery's next event may be due

    async def finish(self) -> None:
        """In-flight attempts get a bounded grace (half the shutdown timeout, at most one
        attempt's timeout); the rest are cancelled: their leases expire and they are sent
        again, with the same ``webhook-id``."""
        grace = min(self._s.webhook_timeout, self._s.shutdown_timeout / 2)
        try:
            if self._inflight:
                await asyncio.wait(set(self._inflight), timeout=grace)
            for task in set(self._inflight):
                task.cancel()
            if self._inflight:
                await asyncio.wait(set(self._inflight), timeout=2.0)
            with contextlib.suppress(*DEPENDENCY_DOWN):
                await self._flush()
        finally:
            for client in [*self._clients.values(), *self._retired]:
                await client.close()
            self._clients.clear()
            self._retired.clear()

    def stopped(self) -> None:
        event(log, "webhook dispatcher stopped")

    def _client(self, claim: Claim) -> EndpointClient:
        client = self._clients.get(claim.endpoint_id)
        if client is None or client.url != claim.url:
            if client is not None:  # its URL changed: closed at the next figures pass
                self._retired.append(client)
            client = self._clients[claim.endpoint_id] = EndpointClient(claim.url, self._s)
        return client

    async def _deliver(self, claim: Claim) -> None:
        text = signing.body(claim.event_type, claim.created_at, claim.fields)
        headers = signing.headers(signing.message_id(claim.event_id), claim.secrets, text)
        reply = await self._client(claim).post(text, headers)
        outcome = self._outcome(claim, reply)
        self._count(outcome, reply)
        self._results.append(outcome)  # written by the next pass, with the others

    def _outcome(self, claim: Claim, reply: Reply) -> Outcome:
        ladder = self._s.webhook_retry_ladder
        exhausted = not reply.ok and claim.attempt_no > len(ladder)
        retry_in = 0.0
        if not reply.ok and not exhausted:
            base = ladder[claim.attempt_no - 1]
            spread = base * self._s.webhook_retry_jitter
            retry_in = max(0.0, base + self._rng.uniform(-spread, spread))
        return Outcome(
            claim,
            reply.ok,
            reply.http_status,
            reply.duration_ms,
            reply.error,
            reply.response,
            retry_in,
            exhausted,
        )

    def _count(self, outcome: Outcome, reply: Reply) -> None:
        claim, wh = outcome.claim, self._inst.webhooks
        labels = {"endpoint": str(claim.endpoint_id)}
        wh.latency_ms.record(reply.duration_ms, labels)
        if reply.ok:
            wh.sent.add(1, labels)
            return
        wh.failed.add(1, {**labels, "reason": reply.reason or "error"})
        if reply.http_status is None or reply.http_status >= 500:
            hold = min(max(outcome.retry_in, self._s.webhook_retry_ladder[0]), HOLD_MAX)
            self._held[claim.endpoint_id] = time.monotonic() + hold
        event(
            log,
            "webhook attempt failed",
            endpoint_id=claim.endpoint_id,
            event_id=claim.event_id,
            attempt=claim.attempt_no,
            http_status=reply.http_status,
            reason=reply.reason,
            error=reply.error,
            retry_in_s=round(outcome.retry_in, 3),
        )

    async def _flush(self) -> None:
        """Write the finished attempts in one statement; kept for the next pass when
        PostgreSQL is down (if the process dies first, the leases run out: sent again)."""
        batch, self._results = self._results, []
        try:
            disabled = await self._store.record(batch)
        except BaseException:
            self._results[:0] = batch
            raise
        ends = {o.claim.endpoint_id: o for o in batch if o.exhausted}
        for off in disabled:
            self._inst.webhooks.disabled.add(1, {"endpoint": str(off.endpoint_id)})
            last = ends.get(off.endpoint_id)
            event(
                log,
                "webhook endpoint disabled",
                logging.ERROR,
                endpoint_id=off.endpoint_id,
                event_id=last.claim.event_id if last else None,
                attempts=last.claim.attempt_no if last else None,
            )

    async def _figures(self) -> None:
        self._figures_at = time.monotonic()
        with contextlib.suppress(MailDaemonError):
            rows = await self._store.backlog()
            table = self._inst.webhooks.backlog
            table.clear()
            table.update({b.endpoint_id: (b.waiting, b.oldest_age_s, int(b.enabled)) for b in rows})
            for gone in set(self._clients) - set(table):
                self._retired.append(self._clients.pop(gone))
        if not self._inflight:
            while self._retired:
                await self._retired.pop().close()
