"""Spans of intake and of a delivery attempt (the attempt itself and its SMTP phases).

An attempt span joins the producer's trace when the command carried a ``traceparent``
(stored with the delivery, so the trace crosses the hop through PostgreSQL). Its children
are the connection phases — ``smtp connect``, ``smtp starttls``, ``smtp auth`` — started
by the transport through its ``phase`` hook whenever it opens a connection, and ``smtp
transaction``: MAIL FROM to the final reply, with the reply code. The transaction span is
drawn at the worker/transport boundary after the send returns (from the end of the last
connection phase, or the start of the send, to its end), so every transport — one
command at a time or pipelined — is covered without tracing inside it.

Intake: one span per batch (``intake batch``) and one per command taken in (``intake
command``), a child of the producer's span when the command carries a ``traceparent``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from maildaemon.delivery import AttemptResult, ClaimedDelivery, IntakeEntry, IntakeResult
from maildaemon.errors import TransportError
from maildaemon.sending.reply import SendReport
from maildaemon.tracing import parent_context


class SmtpPhases:
    """The transport's phase hook: one child span per connection phase of the attempt."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self.ended_ns = 0  # when the last phase of this send ended (time.time_ns)
        self.failed = False  # a phase of this send failed: no transaction took place

    def begin(self) -> int:
        """A send starts: forget the previous one's phases; returns the time (ns)."""
        self.ended_ns, self.failed = 0, False
        return time.time_ns()

    def __call__(self, name: str) -> AbstractContextManager[object]:
        return self._phase(name)

    @contextmanager
    def _phase(self, name: str) -> Iterator[object]:
        try:
            with self._tracer.start_as_current_span(name, kind=SpanKind.CLIENT) as span:
                yield span
        except BaseException:
            self.failed = True
            raise
        finally:
            self.ended_ns = time.time_ns()


def attempt_span(tracer: trace.Tracer, claim: ClaimedDelivery) -> AbstractContextManager[Span]:
    """The span of one delivery attempt, a child of the producer's span when there is one."""
    return tracer.start_as_current_span(
        "delivery attempt",
        context=parent_context(claim.traceparent),
        kind=SpanKind.INTERNAL,
        attributes={
            "maildaemon.delivery_id": claim.delivery_id,
            "maildaemon.source": claim.source,
            "maildaemon.attempt": claim.attempt_no,
        },
    )


def transaction_span(
    tracer: trace.Tracer,
    started_ns: int,
    phases: SmtpPhases,
    report: SendReport | None,
    error: TransportError | None,
) -> None:
    """Record the SMTP transaction (MAIL FROM to the final reply) as a finished child span;
    none when the connection could not be opened (the failed phase's span tells)."""
    if (phases.failed and report is None) or not trace.get_current_span().is_recording():
        return  # no connection, or an attempt nobody records (no exporter, not sampled)
    start = max(started_ns, phases.ended_ns)
    span = tracer.start_span("smtp transaction", kind=SpanKind.CLIENT, start_time=start)
    if report is not None:
        final = report.data_reply or report.data_refused
        if final is not None:
            span.set_attribute("smtp.reply_code", final.code)
        span.set_attribute("smtp.recipients.accepted", len(report.accepted))
        span.set_attribute("smtp.recipients.refused", len(report.refused))
        span.set_attribute("smtp.recipients.deferred", len(report.deferred))
        if report.data_reply is None:
            span.set_status(Status(StatusCode.ERROR, "message not accepted"))
    if error is not None:
        if error.code is not None:
            span.set_attribute("smtp.reply_code", error.code)
        span.set_attribute("error.type", type(error).__name__)
        span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
    span.end()


def describe_result(span: Span, result: AttemptResult) -> None:
    """The attempt's outcome on its span."""
    attributes: Mapping[str, str | int] = {
        "maildaemon.attempt_status": result.attempt_status,
        "maildaemon.delivery_status": result.delivery_status,
    }
    span.set_attributes(attributes)
    if result.reply_code is not None:
        span.set_attribute("smtp.reply_code", result.reply_code)
    if result.delivery_status not in ("sent", "queued"):
        span.set_status(Status(StatusCode.ERROR, result.status_reason or result.delivery_status))


def command_spans(
    tracer: trace.Tracer, result: IntakeResult, batch: trace.Span, started_ns: int
) -> None:
    """One span per command taken in: a child of the producer's span when the command
    carries a ``traceparent``, else of the batch; linked to the batch either way."""
    link = [Link(batch.get_span_context())]
    items: list[tuple[IntakeEntry, str, str | None]] = [
        (e, "accepted", e.command.delivery_id if e.command else None) for e in result.created
    ]
    items += [(e, "replay", delivery_id) for e, delivery_id in result.replays]
    items += [(e, "malformed", r.delivery_id) for e, r in result.rejected]
    for entry, outcome, delivery_id in items:
        cmd = entry.command
        parent = parent_context(cmd.traceparent if cmd else None)
        if parent is None and not batch.is_recording():
            continue  # an unsampled batch: only commands with a producer's trace matter
        span = tracer.start_span(
            "intake command",
            context=parent,
            kind=SpanKind.CONSUMER,
            links=link,
            start_time=started_ns,
            attributes={
                "messaging.message.id": entry.stream_entry_id,
                "maildaemon.intake.result": outcome,
                "maildaemon.delivery_id": delivery_id or "",
            },
        )
        if outcome == "malformed":
            span.set_status(Status(StatusCode.ERROR, "malformed command"))
        span.end()
