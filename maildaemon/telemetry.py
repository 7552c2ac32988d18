"""OpenTelemetry: meter and tracer providers configured from the standard OTEL_* variables.

Metric names follow the operator runbook (``mail.*``). OTLP exporters are attached only
when an endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or the per-signal
variables; ``OTEL_EXPORTER_OTLP_PROTOCOL`` = ``grpc`` or ``http/protobuf``); the
instruments always exist, so the code paths are the same. Sampling follows the standard
``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` (the SDK reads them; default
``parentbased_always_on``) whenever spans are exported; without an exporter no span is
recorded (they keep their ids for the log lines). A
Prometheus text rendering of the same metrics is available for the internal listener's
``/metrics`` when asked for (``prometheus=True``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from maildaemon import __version__
from maildaemon.telemetry_export import otlp_exports, otlp_metric_reader, otlp_span_exporter
from maildaemon.webhook_telemetry import WebhookInstruments, webhook_instruments

log = logging.getLogger("maildaemon.telemetry")

# End-to-end latency spans retries (minutes to hours), not only the first attempt.
_E2E_BUCKETS_MS = (
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
    300_000, 900_000, 3_600_000, 21_600_000,
)  # fmt: skip


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
    poison_ended: metrics.Counter
    lost_claims_released: metrics.Counter
    store_unavailable: metrics.Counter
    events_published: metrics.Counter
    events_unpublished: metrics.Counter
    intake_batch_duration_ms: metrics.Histogram
    end_to_end_latency_ms: metrics.Histogram
    api_refusals: metrics.Counter
    destination_changes: metrics.Counter
    redis_unpersisted: metrics.Counter
    redis_unavailable: metrics.Counter
    messages_too_large: metrics.Counter
    http_refused: metrics.Counter
    http_accept_errors: metrics.Counter
    http_timeouts: metrics.Counter
    http_paced: metrics.Counter
    stream_trimmed: metrics.Counter
    reports: metrics.Counter
    report_refusals: metrics.Counter
    # Gauges: values set by one bounded query every few seconds (scheduler, consumer),
    # read by the exporters; a scrape never queries anything.
    schedule_depth: int = 0
    schedule_oldest_age_ms: int = 0
    dead_letters_unreviewed: int = 0
    consumer_lag: int = 0  # entries in the stream not yet delivered to the group
    consumer_pending: int = 0  # entries delivered to the group, not yet acknowledged
    destination_up: int = 1  # 1 while the SMTP destination can be reached, else 0
    redis_persistence: int = -1  # 1 AOF on, 0 off, -1 not known (CONFIG refused)
    http_connections_open: int = 0  # connections the internal listener holds open
    command_stream_length: int = 0  # entries in the command stream (XLEN), set by the trimmer
    command_stream_memory: int = -1  # its bytes (MEMORY USAGE); -1 not known (refused)
    webhooks: WebhookInstruments = field(init=False)

    def count_paced(self, outcome: str, limit: str) -> None:
        """A request over the listener's rate: ``delayed`` or ``refused``, by which bucket."""
        self.http_paced.add(1, {"outcome": outcome, "limit": limit})


class Telemetry:
    """Owns the providers: built at startup, flushed and shut down last."""

    def __init__(
        self,
        readers: Iterable[MetricReader] = (),
        span_processors: Iterable[SpanProcessor] = (),
        *,
        prometheus: bool = False,
    ) -> None:
        resource = Resource.create(
            {
                "service.name": os.environ.get("OTEL_SERVICE_NAME", "maildaemon"),
                "service.version": __version__,
            }
        )
        readers = list(readers)
        self.exporting = otlp_exports("METRICS", "OTEL_METRICS_EXPORTER")
        if self.exporting:
            readers.append(otlp_metric_reader())
        # Renders the metrics in Prometheus text format; None unless asked for.
        self.prometheus: Callable[[], bytes] | None = None
        if prometheus:
            readers.append(self._prometheus_reader())
        views = [
            View(
                instrument_name="mail.delivery.end_to_end_latency_ms",
                aggregation=ExplicitBucketHistogramAggregation(_E2E_BUCKETS_MS),
            )
        ]
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers, views=views)
        processors = list(span_processors)
        self.exporting_traces = otlp_exports("TRACES", "OTEL_TRACES_EXPORTER")
        if self.exporting_traces:
            processors.append(BatchSpanProcessor(otlp_span_exporter()))
        # Spans are recorded only when something takes them: with no exporter, every span
        # is a non-recording one (it still has ids, so log lines still correlate) and a
        # delivery costs little more than without tracing. Otherwise OTEL_TRACES_SAMPLER
        # decides (the SDK reads it).
        self.tracing = bool(processors)
        self.tracer_provider = TracerProvider(
            resource=resource, sampler=None if self.tracing else ALWAYS_OFF
        )
        for processor in processors:
            self.tracer_provider.add_span_processor(processor)
        self.traced = self.tracer_provider if self.tracing else None  # recording provider
        self.tracer = self.tracer_provider.get_tracer("maildaemon", __version__)
        self.instruments = _instruments(self.meter_provider.get_meter("maildaemon", __version__))

    def _prometheus_reader(self) -> MetricReader:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        reader = PrometheusMetricReader(registry=registry, disable_target_info=False)
        self.prometheus = lambda: generate_latest(registry)
        return reader

    def shutdown(self) -> None:
        for provider in (self.meter_provider, self.tracer_provider):
            try:
                provider.force_flush(5_000)
                provider.shutdown()
            except Exception as exc:  # telemetry must never block the exit
                log.warning("telemetry flush failed", extra={"error": repr(exc)})


def _service_counters(
    meter: metrics.Meter,
) -> tuple[metrics.Counter, metrics.Counter, metrics.Counter, metrics.Counter]:
    """Counters of the process around the pipeline: API refusals, destination, Redis."""
    counter = meter.create_counter
    return (
        counter(
            "mail.api.refusals",
            description="Internal API requests refused, by reason (unauthorized, "
            "query_timeout, store_unavailable, rate_limited, misdirected_request, bad_host, "
            "body_timeout)",
        ),
        counter(
            "mail.smtp.destination.changes",
            description="The SMTP destination went down or came back up, by state",
        ),
        counter(
            "mail.redis.unpersisted",
            description="Startups that found Redis without an append-only file",
        ),
        counter(
            "mail.redis.unavailable",
            description="Operations that found Redis down (or a demoted master)",
        ),
    )


def _listener_counters(
    meter: metrics.Meter,
) -> tuple[metrics.Counter, metrics.Counter, metrics.Counter, metrics.Counter]:
    """Counters of the internal HTTP listener's socket: refusals, accept errors, timeouts,
    requests paced."""
    counter = meter.create_counter
    return (
        counter(
            "mail.http.connections.refused",
            description="Connections refused (503, closed) beyond "
            "MAIL_INTERNAL_HTTP_MAX_CONNECTIONS",
        ),
        counter(
            "mail.http.accept_errors",
            description="accept() failures of the internal listener (out of file "
            "descriptors or memory), by error",
        ),
        counter(
            "mail.http.timeouts",
            description="Connections closed because a request head or body came too slowly, "
            "by phase (header, body)",
        ),
        counter(
            "mail.http.requests.paced",
            description="Requests over MAIL_INTERNAL_HTTP_REQUEST_RATE, by outcome (delayed, "
            "refused with 503) and the bucket (peer, listener)",
        ),
    )


def _instruments(meter: metrics.Meter) -> Instruments:
    counter, histogram = meter.create_counter, meter.create_histogram
    refusals, changes, unpersisted, redis_down = _service_counters(meter)
    http_refused, http_accept_errors, http_timeouts, http_paced = _listener_counters(meter)
    inst = Instruments(
        reports=counter(
            "mail.reports.recorded",
            description="Bounce, delay, complaint and other reports recorded, by kind and "
            "match_status",
        ),
        report_refusals=counter(
            "mail.reports.refused",
            description="Report listener refusals, by reason (relay, connections, "
            "store_unavailable, unusable)",
        ),
        stream_commands=counter(
            "mail.stream_commands", description="Stream entries taken in, by result"
        ),
        stream_commands_malformed=counter(
            "mail.stream_commands.malformed", description="Stream entries rejected"
        ),
        attempt_outcomes=counter("mail.attempt.outcomes", description="SMTP attempts by status"),
        delivery_outcomes=counter(
            "mail.delivery.outcomes", description="Deliveries reaching a state, by status"
        ),
        dead_letters=counter("mail.delivery.dead_letters", description="Deliveries dead-lettered"),
        suppressed=counter("mail.delivery.suppressed", description="Deliveries ended suppressed"),
        send_duration_ms=histogram(
            "mail.provider.send.duration_ms",
            unit="ms",
            description="Duration of one SMTP send (MAIL FROM to the final reply)",
        ),
        claims=counter("mail.attempt_schedule.claims", description="Deliveries claimed"),
        fenced_writes=counter(
            "mail.attempt.fenced_writes",
            description="Results refused because the lease had been reclaimed",
        ),
        lost_claims_released=counter(
            "mail.attempt_schedule.lost_claims_released",
            description="Leases given back at reconnect from claims whose commit reply was lost",
        ),
        poison_ended=counter(
            "mail.delivery.poison",
            description="Deliveries whose own data broke a component, ended or retried in "
            "its place, by component and failure_code",
        ),
        store_unavailable=counter(
            "mail.store.unavailable", description="Operations that found PostgreSQL down"
        ),
        events_published=counter(
            "mail.events.published", description="Outcome events moved to the event stream"
        ),
        events_unpublished=counter(
            "mail.events.publish_failures",
            description="Outbox passes that could not publish (Redis or PostgreSQL down)",
        ),
        intake_batch_duration_ms=histogram(
            "mail.intake.batch.duration_ms",
            unit="ms",
            description="One intake batch: validation, the PostgreSQL transaction, XACK",
        ),
        end_to_end_latency_ms=histogram(
            "mail.delivery.end_to_end_latency_ms",
            unit="ms",
            description="From the command's stream entry id (XADD time) to SMTP acceptance",
        ),
        api_refusals=refusals,
        destination_changes=changes,
        redis_unpersisted=unpersisted,
        redis_unavailable=redis_down,
        messages_too_large=counter(
            "mail.smtp.messages_too_large",
            description="Messages refused before sending: larger than the server's SIZE",
        ),
        http_refused=http_refused,
        http_accept_errors=http_accept_errors,
        http_timeouts=http_timeouts,
        http_paced=http_paced,
        stream_trimmed=counter(
            "mail.stream.trimmed",
            description="Command stream entries trimmed (all durable in PostgreSQL)",
        ),
    )
    _start_at_zero(inst)
    _observe(meter, inst)
    inst.webhooks = webhook_instruments(meter)
    return inst


API_REFUSAL_REASONS = (
    "unauthorized",
    "query_timeout",
    "store_unavailable",
    "rate_limited",
    "misdirected_request",
    "bad_host",
    "body_timeout",
)


def _start_at_zero(inst: Instruments) -> None:
    """Counters of rare events start at 0, so a dashboard or rate() sees them before the
    first one happens (and "absent" means "not scraped", not "never happened")."""
    for counter in (
        inst.claims,
        inst.fenced_writes,
        inst.events_published,
        inst.messages_too_large,
        inst.lost_claims_released,
    ):
        counter.add(0)
    inst.events_unpublished.add(0)
    for component in ("consumer", "scheduler", "results"):
        inst.store_unavailable.add(0, {"component": component})
    for reason in API_REFUSAL_REASONS:
        inst.api_refusals.add(0, {"reason": reason})
    inst.http_refused.add(0)
    inst.http_accept_errors.add(0, {"error": "EMFILE"})
    for phase in ("header", "body"):
        inst.http_timeouts.add(0, {"phase": phase})
    for outcome in ("delayed", "refused"):
        for limit in ("peer", "listener"):
            inst.http_paced.add(0, {"outcome": outcome, "limit": limit})
    for state in ("down", "up"):
        inst.destination_changes.add(0, {"state": state})
    inst.redis_unpersisted.add(0)
    inst.stream_trimmed.add(0)
    inst.redis_unavailable.add(0, {"component": "consumer"})
    for kind in ("bounce", "complaint"):  # the bounce- and complaint-rate alerts read them
        inst.reports.add(0, {"kind": kind, "match_status": "matched"})
    for reason in ("relay", "connections", "store_unavailable"):
        inst.report_refusals.add(0, {"reason": reason})
    for component, code in (
        ("scheduler", "store_unreadable"),
        ("scheduler", "unprocessable"),
        ("worker", "attempt_fault"),
        ("results", "unrecordable_reply"),
        ("results", "unrecordable_result"),
    ):
        inst.poison_ended.add(0, {"component": component, "failure_code": code})


def _observe(meter: metrics.Meter, inst: Instruments) -> None:
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
        "mail.dead_letters.unreviewed",
        callbacks=[_gauge(lambda: inst.dead_letters_unreviewed)],
        description="Dead letters nobody has reviewed yet",
    )
    meter.create_observable_gauge(
        "mail.stream.consumer_lag",
        callbacks=[_gauge(lambda: inst.consumer_lag)],
        description="Command stream entries not yet delivered to the consumer group",
    )
    meter.create_observable_gauge(
        "mail.stream.consumer_pending",
        callbacks=[_gauge(lambda: inst.consumer_pending)],
        description="Command stream entries read by the group and not yet acknowledged",
    )
    meter.create_observable_gauge(
        "mail.stream.length",
        callbacks=[_gauge(lambda: inst.command_stream_length)],
        description="Entries in the command stream (XLEN), after the last trim",
    )
    meter.create_observable_gauge(
        "mail.stream.memory_bytes",
        unit="By",
        callbacks=[_gauge(lambda: inst.command_stream_memory)],
        description="Memory of the command stream (MEMORY USAGE); -1 when Redis refuses it",
    )

    meter.create_observable_gauge(
        "mail.smtp.destination.up",
        callbacks=[_gauge(lambda: inst.destination_up)],
        description="1 while the SMTP destination can be reached, 0 while it is down",
    )
    meter.create_observable_gauge(
        "mail.http.connections.open",
        callbacks=[_gauge(lambda: inst.http_connections_open)],
        description="Connections the internal HTTP listener holds open",
    )
    meter.create_observable_gauge(
        "mail.redis.persistence",
        callbacks=[_gauge(lambda: inst.redis_persistence)],
        description="Redis append-only file: 1 on, 0 off (stream at risk), -1 unknown",
    )


def _gauge(read: Callable[[], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(_: CallbackOptions) -> Iterable[Observation]:
        yield Observation(read())

    return callback
