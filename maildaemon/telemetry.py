"""OpenTelemetry: meter and tracer providers configured from the standard OTEL_* variables.

Metric names follow the operator runbook (``mail.*``). Exporters are attached only when an
OTLP endpoint is configured; the instruments always exist, so the code paths are the same.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from maildaemon import __version__

log = logging.getLogger("maildaemon.telemetry")


@dataclass
class Instruments:
    stream_commands: metrics.Counter
    stream_commands_malformed: metrics.Counter
    attempt_outcomes: metrics.Counter
    delivery_outcomes: metrics.Counter
    dead_letters: metrics.Counter
    suppressed: metrics.Counter
    send_duration_ms: metrics.Histogram
    claims: metrics.Counter
    fenced_writes: metrics.Counter
    store_unavailable: metrics.Counter
    events_published: metrics.Counter
    events_unpublished: metrics.Counter
    api_refusals: metrics.Counter
    destination_changes: metrics.Counter
    redis_unpersisted: metrics.Counter
    redis_unavailable: metrics.Counter
    # Gauges read from the scheduler's last observation.
    schedule_depth: int = 0
    schedule_oldest_age_ms: int = 0
    destination_up: int = 1  # 1 while the SMTP destination can be reached, else 0
    redis_persistence: int = -1  # 1 AOF on, 0 off, -1 not known (CONFIG refused)


class Telemetry:
    """Owns the providers: built at startup, flushed and shut down last."""

    def __init__(self, readers: Iterable[MetricReader] = ()) -> None:
        resource = Resource.create(
            {
                "service.name": os.environ.get("OTEL_SERVICE_NAME", "maildaemon"),
                "service.version": __version__,
            }
        )
        readers = list(readers)
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
        )
        self.exporting = bool(endpoint) and os.environ.get("OTEL_SDK_DISABLED") != "true"
        if self.exporting:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        self.tracer_provider = TracerProvider(resource=resource)
        if self.exporting:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            self.tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        meter = self.meter_provider.get_meter("maildaemon", __version__)
        self.tracer = self.tracer_provider.get_tracer("maildaemon", __version__)
        self.instruments = Instruments(
            stream_commands=meter.create_counter(
                "mail.stream_commands", description="Stream entries taken in, by result"
            ),
            stream_commands_malformed=meter.create_counter(
                "mail.stream_commands.malformed", description="Stream entries rejected"
            ),
            attempt_outcomes=meter.create_counter(
                "mail.attempt.outcomes", description="SMTP attempts by status"
            ),
            delivery_outcomes=meter.create_counter(
                "mail.delivery.outcomes", description="Deliveries reaching a state, by status"
            ),
            dead_letters=meter.create_counter(
                "mail.delivery.dead_letters", description="Deliveries dead-lettered"
            ),
            suppressed=meter.create_counter(
                "mail.delivery.suppressed", description="Deliveries ended suppressed"
            ),
            send_duration_ms=meter.create_histogram(
                "mail.provider.send.duration_ms",
                unit="ms",
                description="Duration of one SMTP send (MAIL FROM to the final reply)",
            ),
            claims=meter.create_counter(
                "mail.attempt_schedule.claims", description="Deliveries claimed"
            ),
            fenced_writes=meter.create_counter(
                "mail.attempt.fenced_writes",
                description="Results refused because the lease had been reclaimed",
            ),
            store_unavailable=meter.create_counter(
                "mail.store.unavailable", description="Operations that found PostgreSQL down"
            ),
            events_published=meter.create_counter(
                "mail.events.published", description="Outcome events moved to the event stream"
            ),
            events_unpublished=meter.create_counter(
                "mail.events.publish_failures",
                description="Outbox passes that could not publish (Redis or PostgreSQL down)",
            ),
            api_refusals=meter.create_counter(
                "mail.api.refusals",
                description="Operator API requests refused, by reason (unauthorized, "
                "query_timeout, store_unavailable)",
            ),
            redis_unavailable=meter.create_counter(
                "mail.redis.unavailable",
                description="Operations that found Redis down (or a demoted master)",
            ),
            destination_changes=meter.create_counter(
                "mail.smtp.destination.changes",
                description="The SMTP destination went down or came back up, by state",
            ),
            redis_unpersisted=meter.create_counter(
                "mail.redis.unpersisted",
                description="Startups that found Redis without an append-only file",
            ),
        )
        inst = self.instruments
        meter.create_observable_gauge(
            "mail.attempt_schedule.depth",
            callbacks=[_gauge(lambda: inst.schedule_depth)],
            description="Deliveries due now and not yet attempted",
        )
        meter.create_observable_gauge(
            "mail.attempt_schedule.oldest_age_ms",
            unit="ms",
            callbacks=[_gauge(lambda: inst.schedule_oldest_age_ms)],
            description="How long the oldest due delivery has waited",
        )
        meter.create_observable_gauge(
            "mail.smtp.destination.up",
            callbacks=[_gauge(lambda: inst.destination_up)],
            description="1 while the SMTP destination can be reached, 0 while it is down",
        )
        meter.create_observable_gauge(
            "mail.redis.persistence",
            callbacks=[_gauge(lambda: inst.redis_persistence)],
            description="Redis append-only file: 1 on, 0 off (stream at risk), -1 unknown",
        )

    def shutdown(self) -> None:
        for provider in (self.meter_provider, self.tracer_provider):
            try:
                provider.force_flush(5_000)
                provider.shutdown()
            except Exception as exc:  # telemetry must never block the exit
                log.warning("telemetry flush failed", extra={"error": repr(exc)})


def _gauge(read: Callable[[], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(_: CallbackOptions) -> Iterable[Observation]:
        yield Observation(read())

    return callback
