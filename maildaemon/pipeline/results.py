"""Result writer: attempt results into PostgreSQL in batches (with their outcome events).

Workers hand a result over and go on with the next job; the writer commits whatever has
accumulated while its previous transaction ran (group commit, so a busy daemon writes
hundreds of results per transaction). A worker's queue slot is released only when its
result is committed, which bounds what can be waiting. A worker cancelled during shutdown
still gets its result written: the writer is the last component to stop and flushes
everything handed to it. Writes are fenced by claim token. The outcome events go into the
outbox in the same transaction; ``events.EventPublisher`` moves them to Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from maildaemon.config import Settings
from maildaemon.delivery import AttemptResult, RecipientOutcome
from maildaemon.errors import StoreRejected, StoreUnavailable
from maildaemon.logs import event, recipients_field
from maildaemon.pipeline.lifecycle import unavailable
from maildaemon.retry import Backoff
from maildaemon.store.pipeline.db import Store
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.results")

_EVENT_NAMES = {
    "sent": "delivery sent",
    "queued": "delivery retry scheduled",
    "dead_letter": "delivery dead-lettered",
    "suppressed": "delivery suppressed",
    "failed": "delivery failed",
    "expired": "delivery expired",
    "cancelled": "delivery cancelled",
}
_MAX_BATCH = 500
_GATHER = 0.002  # seconds a flush waits for company; bounds the latency it adds


@dataclass(frozen=True, slots=True)
class Trail:
    """What the outcome's log line tells besides the result: whom the attempt was for,
    and the trace and span ids of the attempt (the line is written after the commit,
    outside the attempt's span)."""

    recipients: tuple[str, ...] = ()
    trace_ids: Mapping[str, str] = field(default_factory=dict)


_NO_TRAIL = Trail()


class ResultWriter:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        instruments: Instruments,
        worker_name: str,
        on_recorded: Callable[[], None] | None = None,
    ) -> None:
        self._s = settings
        self._store = store
        self._on_recorded = on_recorded  # wakes the event publisher after a commit
        self._inst = instruments
        self._worker = worker_name
        self._pending: list[tuple[AttemptResult, asyncio.Future[bool], Trail]] = []
        self._full = settings.log_recipients == "full"
        self._wake = asyncio.Event()
        self._closing = False

    def submit(self, result: AttemptResult, trail: Trail = _NO_TRAIL) -> asyncio.Future[bool]:
        """Hand a result over. The future resolves once the result's transaction has
        committed: True if recorded, False if the fence refused it. The result is written
        whatever happens to the caller (the writer stops last and flushes everything)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((result, future, trail))
        self._wake.set()
        return future

    async def record(self, results: Sequence[AttemptResult]) -> list[bool]:
        """Hand results over and wait (shielded) until they are committed."""
        futures = [self.submit(r) for r in results]
        return list(await asyncio.shield(asyncio.gather(*futures)))

    def close(self) -> None:
        """Finish what was handed over, then stop."""
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if len(self._pending) < _MAX_BATCH and not self._closing:
                await asyncio.sleep(_GATHER)  # let more results join this transaction
            while self._pending:
                batch, self._pending = self._pending[:_MAX_BATCH], self._pending[_MAX_BATCH:]
                await self._flush(batch)
            if self._closing:
                return

    async def _flush(self, batch: list[tuple[AttemptResult, asyncio.Future[bool], Trail]]) -> None:
        results = [r for r, _, _ in batch]
        try:
            recorded = await self._write(results)
        except StoreRejected as exc:
            recorded = await self._write_apart(results, exc)
        for result, future, trail in batch:
            ok = result.delivery_id in recorded
            if not future.done():
                future.set_result(ok)
            self._report(result, ok, trail)
        if recorded and self._on_recorded is not None:
            self._on_recorded()

    async def _write_apart(self, results: list[AttemptResult], cause: StoreRejected) -> set[str]:
        """PostgreSQL refused the batch for what one result holds: write each alone, and a
        result refused alone as written without its texts, then as its bare ending
        (``unrecordable_result``). A refusal of even that is no result's data: it stops
        the writer (and the daemon) loudly."""
        event(log, "result batch refused", logging.WARNING, error=str(cause), size=len(results))
        recorded: set[str] = set()
        for result in results:
            last: StoreRejected = cause
            for step, candidate in enumerate(storable_forms(result)):
                try:
                    recorded |= await self._write([candidate])
                except StoreRejected as exc:
                    last = exc
                    continue
                if step:
                    self._unrecordable(result, candidate, last)
                break
            else:
                raise last
        return recorded

    def _unrecordable(self, result: AttemptResult, kept: AttemptResult, exc: Exception) -> None:
        code = kept.failure_code or "unrecordable_reply"
        self._inst.poison_ended.add(1, {"component": "results", "failure_code": code})
        event(
            log,
            "attempt result unrecordable",
            logging.ERROR,
            delivery_id=result.delivery_id,
            source=result.source,
            attempt=result.attempt_no,
            failure_code=code,
            status=kept.delivery_status,
            error=str(exc)[:500],
        )

    async def _write(self, results: list[AttemptResult]) -> set[str]:
        backoff = Backoff()
        while True:
            try:
                return await self._store.record_results(
                    results, self._worker, self._s.suppression_ttl
                )
            except StoreUnavailable as exc:
                # A result may stand for a message already accepted: never drop it (and
                # never give up because of a stop: the writer stops last).
                wait = backoff.next()
                unavailable(log, self._inst, "results", exc, wait, pending=len(results))
                await asyncio.sleep(wait)

    def _report(self, r: AttemptResult, recorded: bool, trail: Trail) -> None:
        """Count the outcome and write its one line: the line an operator greps."""
        inst = self._inst
        if not recorded:
            inst.fenced_writes.add(1)
            event(
                log,
                "attempt result fenced out",
                logging.WARNING,
                delivery_id=r.delivery_id,
                source=r.source,
                attempt=r.attempt_count,
                status=r.delivery_status,
                claim_token=r.claim_token,
                reason="the lease expired and the delivery was claimed again",
                **trail.trace_ids,
            )
            return
        if r.record_attempt:
            inst.attempt_outcomes.add(1, {"status": r.attempt_status})
        inst.delivery_outcomes.add(1, {"status": r.delivery_status})
        if r.delivery_status == "dead_letter":
            inst.dead_letters.add(1, {"source": r.source})
        elif r.delivery_status == "suppressed":
            inst.suppressed.add(1, {"source": r.source})
        level = logging.INFO if r.delivery_status in _QUIET else logging.WARNING
        if not log.isEnabledFor(level):
            return
        event(
            log,
            _EVENT_NAMES.get(r.delivery_status, "delivery updated"),
            level,
            delivery_id=r.delivery_id,
            source=r.source,
            attempt=r.attempt_count,  # attempts on record, as the delivery's attempt_count
            attempt_recorded=r.record_attempt,
            status=r.delivery_status,
            attempt_status=r.attempt_status,
            reply_code=r.reply_code,
            recipients=recipients_field(trail.recipients or tuple(r.recipients), self._full),
            **_details(r),
            **trail.trace_ids,
        )


# Sent and retry scheduled log at INFO; every other ending at WARNING (it wants a look).
_QUIET = frozenset({"sent", "queued"})


def storable_forms(r: AttemptResult) -> Iterator[AttemptResult]:
    """The result as it is, then without the server's texts, then as its bare ending."""
    yield r
    note = "the server's reply text could not be stored"
    yield dataclasses.replace(
        r,
        reply_text=note if r.reply_text is not None else None,
        status_reason=note if r.status_reason is not None else None,
        recipients={a: RecipientOutcome(o.outcome, o.code, None) for a, o in r.recipients.items()},
        failure_code=r.failure_code or "unrecordable_reply",
    )
    yield AttemptResult(
        delivery_id=r.delivery_id,
        source=r.source,
        claim_token=r.claim_token,
        attempt_no=r.attempt_no,
        attempt_status=r.attempt_status,
        delivery_status="sent" if r.delivery_status == "sent" else "failed",
        started_at=r.started_at,
        finished_at=r.finished_at,
        status_reason="the attempt's result could not be stored (see the daemon's log)",
        failure_code="unrecordable_result",
        possible_duplicate=r.possible_duplicate,
        record_attempt=r.record_attempt,
        claimed=r.claimed,
    )


def _details(r: AttemptResult) -> dict[str, object]:
    """Fields only some outcomes have (kept off the hot "sent" line when empty)."""
    out: dict[str, object] = {}
    if r.delivery_status != "sent":
        out["reply_text"] = r.reply_text
        out["reason"] = r.status_reason
    if r.next_attempt_at is not None:
        out["next_attempt_at"] = r.next_attempt_at.isoformat()
    if r.possible_duplicate:
        out["possible_duplicate"] = True
    return out
