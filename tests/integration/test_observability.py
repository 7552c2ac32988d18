"""Traces, metrics and outcome lines of a real delivery, read with the SDK's in-memory
exporters, and the Prometheus text served at /metrics."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiohttp
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from maildaemon.app import App
from maildaemon.config import Settings
from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.logs import JsonFormatter
from maildaemon.operator import webhooks as webhook_ops
from maildaemon.store.operator.records import Actor
from maildaemon.store.pipeline.db import Store
from maildaemon.store.webhooks.admin import WebhookAdmin
from maildaemon.telemetry import Telemetry
from tests.conftest import REPO
from tests.support import Db, command, wait_for, xadd
from tests.unit.test_runbook import RUNBOOK_METRICS, prometheus_name
from tests.webhook_receiver import Receiver

MakeSettings = Callable[..., Settings]


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    out: dict[str, list[Any]] = {}
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


@contextmanager
def json_log() -> Iterator[io.StringIO]:
    """maildaemon's log lines as the daemon writes them (the JSON formatter, at INFO/DEBUG)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("maildaemon")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


@asynccontextmanager
async def daemon(settings: Settings, telemetry: Telemetry) -> AsyncIterator[App]:
    app = App(settings, telemetry)
    task = asyncio.create_task(app.run())
    try:
        await wait_for(lambda: _running(app, task))
        yield app
    finally:
        app.request_stop()
        assert await asyncio.wait_for(task, 30) == 0


async def _running(app: App, task: asyncio.Task[int]) -> bool:
    if task.done():
        task.result()
        raise AssertionError("the daemon stopped during startup")
    return app.readiness.workers_running


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


async def test_delivery_trace_metrics_and_log_line(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    smtp_sink.behaviour.auth = ("mailer", "s3cret")
    settings = make_settings(smtp_username="mailer", smtp_password="s3cret")
    reader = InMemoryMetricReader()
    spans = InMemorySpanExporter()
    telemetry = Telemetry(readers=[reader], span_processors=[SimpleSpanProcessor(spans)])
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    db = Db(settings.dsn)
    caller_trace = secrets.token_hex(16)
    with json_log() as out:
        async with daemon(settings, telemetry) as app:
            traced = command("traced-1", traceparent=f"00-{trace_id}-{parent_id}-01")
            await xadd(settings, {**traced, "to": ["Ada@Example.COM"]})
            await db.wait_status("traced-1", "sent")
            await wait_for(lambda: _has(out, "delivery sent"))
            measured = points(reader)
            base = f"http://127.0.0.1:{app.http_port}"
            headers = {"traceparent": f"00-{caller_trace}-{secrets.token_hex(8)}-01"}
            async with aiohttp.ClientSession() as http:
                async with http.get(
                    f"{base}/api/v1/internal/deliveries/traced-1", headers=headers
                ) as r:
                    assert r.status == 200
                async with http.get(f"{base}/readyz") as r:
                    assert r.status == 200

    # Metrics, with their values.
    assert _by(measured, "mail.attempt.outcomes", "status") == {"sent": 1}
    assert _by(measured, "mail.delivery.outcomes", "status") == {"sent": 1}
    assert _by(measured, "mail.stream_commands", "result") == {"accepted": 1}
    [send] = measured["mail.provider.send.duration_ms"]
    assert send.count == 1 and send.sum > 0
    [e2e] = measured["mail.delivery.end_to_end_latency_ms"]
    assert e2e.count == 1 and 0 <= e2e.sum < 15_000
    assert sum(p.count for p in measured["mail.intake.batch.duration_ms"]) >= 1
    assert [p.value for p in measured["mail.stream.consumer_lag"]] == [0]
    assert [p.value for p in measured["mail.stream.consumer_pending"]] == [0]

    # The trace: the producer's span is the ancestor of the intake and of the attempt.
    finished = {s.context.span_id: s for s in spans.get_finished_spans()}
    ours = [s for s in finished.values() if format(s.context.trace_id, "032x") == trace_id]
    by_name = {s.name: s for s in ours}
    attempt = by_name["delivery attempt"]
    assert _ancestry(attempt, finished)[-1] == int(parent_id, 16)
    assert by_name["intake command"].parent is not None
    assert by_name["intake command"].parent.span_id == int(parent_id, 16)
    for phase in ("smtp connect", "smtp starttls", "smtp auth", "smtp transaction"):
        span = by_name[phase]
        assert span.parent is not None and span.parent.span_id == attempt.context.span_id, phase
    assert by_name["smtp transaction"].attributes is not None
    assert by_name["smtp transaction"].attributes["smtp.reply_code"] == 250
    assert by_name["smtp connect"].end_time <= by_name["smtp transaction"].start_time  # type: ignore[operator]
    assert attempt.attributes is not None
    assert attempt.attributes["maildaemon.delivery_status"] == "sent"
    assert any(s.name == "intake batch" for s in finished.values())
    # Operator API requests get server spans in the caller's trace; probes get none.
    server = [s for s in finished.values() if s.kind.name == "SERVER"]
    assert [format(s.context.trace_id, "032x") for s in server] == [caller_trace]

    # Log lines: one written during the attempt and the outcome line carry the trace.
    lines = _lines(out)
    connected = next(line for line in lines if line["event"] == "smtp connected")
    assert connected["otel_trace_id"] == trace_id
    assert connected["otel_span_id"] == format(attempt.context.span_id, "016x")
    [sent] = [line for line in lines if line["event"] == "delivery sent"]
    assert sent["level"] == "info"
    assert sent["otel_trace_id"] == trace_id
    assert sent["otel_span_id"] == format(attempt.context.span_id, "016x")
    assert sent["delivery_id"] == "traced-1" and sent["source"] == "authsession"
    assert sent["attempt"] == 1 and sent["reply_code"] == 250
    assert sent["recipients"] == ["example.com"]  # domains only, by default
    assert "Ada" not in json.dumps(sent)
    assert sum(1 for line in lines if line["event"] == "ready") == 1


def _by(measured: dict[str, list[Any]], name: str, key: str) -> dict[str, int]:
    return {p.attributes[key]: p.value for p in measured.get(name, [])}


def _ancestry(span: ReadableSpan, spans: dict[int, ReadableSpan]) -> list[int]:
    """Span ids from the span's parent up to the first parent not in this process."""
    chain: list[int] = []
    parent = span.parent
    while parent is not None:
        chain.append(parent.span_id)
        above = spans.get(parent.span_id)
        parent = above.parent if above is not None else None
    return chain


async def _has(out: io.StringIO, name: str) -> bool:
    return any(line["event"] == name for line in _lines(out))


async def test_outcome_lines_for_retry_dead_letter_and_full_recipients(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    smtp_sink.behaviour.rcpt_replies["busy@example.org"] = ["450 4.2.1 busy"] * 2
    settings = make_settings(retry_ladder="0.1s", retry_jitter=0, log_recipients="full")
    db = Db(settings.dsn)
    with json_log() as out:
        async with daemon(settings, Telemetry()):
            await xadd(settings, command("busy-1", to=["busy@example.org"]))
            await db.wait_status("busy-1", "dead_letter")
            await wait_for(lambda: _has(out, "delivery dead-lettered"))
    lines = [line for line in _lines(out) if line.get("delivery_id") == "busy-1"]
    retry = next(line for line in lines if line["event"] == "delivery retry scheduled")
    dead = next(line for line in lines if line["event"] == "delivery dead-lettered")
    assert retry["level"] == "info" and retry["attempt"] == 1 and retry["reply_code"] == 450
    assert retry["next_attempt_at"]
    assert dead["attempt"] == 2 and dead["reply_code"] == 450 and dead["reason"]
    assert dead["recipients"] == ["busy@example.org"]  # MAIL_LOG_RECIPIENTS=full
    assert len(dead["otel_trace_id"]) == 32  # no traceparent: the attempt started a trace


async def test_metrics_endpoint_serves_prometheus_text(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    """/metrics parses as Prometheus text, holds the runbook's metrics, and holds every
    metric the Grafana dashboard and the alert rules in deploy/ query."""
    smtp_sink.behaviour.rcpt_replies["gone@example.com"] = ["550 5.1.1 unknown user"]
    smtp_sink.behaviour.rcpt_replies["busy@example.com"] = ["450 4.2.1 busy"] * 2
    settings = make_settings(
        metrics_prometheus=True,
        retry_ladder="0.1s",
        retry_jitter=0,
        webhook_allow_http=True,
        webhook_allowed_networks="127.0.0.0/8",
        webhook_retry_ladder="0.1s,0.1s,0.1s",
        webhook_poll_interval="0.1s",
    )
    db = Db(settings.dsn)
    receiver = Receiver(plan=[500])  # one failed webhook attempt, then accepted
    await receiver.start()
    async with daemon(settings, Telemetry(prometheus=True)) as app:
        store = await Store.open(settings.dsn, min_size=1, max_size=2)
        try:
            await webhook_ops.add(
                WebhookAdmin(store.pool),
                webhook_ops.TargetRules(True, ("127.0.0.0/8",), 60.0),
                receiver.url, None, None, Actor("t"), None,
            )  # fmt: skip
        finally:
            await store.close()
        docs = [command("m-ok"), command("m-gone", to=["gone@example.com"])]
        await xadd(settings, *docs, command("m-busy", to=["busy@example.com"]), "{")
        await db.wait_status("m-ok", "sent")
        await db.wait_status("m-gone", "suppressed")
        await db.wait_status("m-busy", "dead_letter")
        await wait_for(lambda: asyncio.sleep(0, len(receiver.accepted()) >= 3))
        await wait_for(lambda: asyncio.sleep(0, app.telemetry.instruments.webhooks.backlog != {}))
        await receiver.stop()
        url = f"http://127.0.0.1:{app.http_port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await response.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {s.name for f in families.values() for s in f.samples}
    sent = [
        s.value
        for s in families["mail_attempt_outcomes"].samples
        if s.name == "mail_attempt_outcomes_total" and s.labels["status"] == "sent"
    ]
    assert sent == [1.0]
    # Every metric the runbook names, under its Prometheus name.
    for name in RUNBOOK_METRICS:
        assert any(s.startswith(prometheus_name(name)) for s in samples), (name, sorted(samples))
    for path in ("deploy/grafana/maildaemon.json", "deploy/prometheus/alerts.yml"):
        queried = set(re.findall(r"\bmail_[a-z0-9_]+", (REPO / path).read_text()))
        assert queried, path
        assert queried <= samples, (path, sorted(queried - samples))


async def test_metrics_endpoint_off_by_default(make_settings: MakeSettings) -> None:
    settings = make_settings()
    async with daemon(settings, Telemetry()) as app:
        url = f"http://127.0.0.1:{app.http_port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            assert response.status == 404


async def test_consumer_lag_and_pending_from_the_group(make_settings: MakeSettings) -> None:
    """XINFO GROUPS (or, before Redis 7, a bounded XRANGE) feeds the lag gauges."""
    from typing import cast

    from maildaemon.pipeline.consumer import StreamConsumer
    from tests.support import redis_client

    settings = make_settings()
    telemetry = Telemetry()
    inst = telemetry.instruments
    client = redis_client(settings.redis_master_addr)
    consumer = StreamConsumer(
        settings, client, cast(Any, None), cast(Any, None), telemetry.instruments, lambda: None
    )
    try:
        await consumer.ensure_group()
        await xadd(settings, *[command(f"lag-{i}") for i in range(5)])
        await consumer._observe_lag()
        assert (inst.consumer_lag, inst.consumer_pending) == (5, 0)
        await client.xreadgroup(
            settings.consumer_group, "other", {settings.command_stream: ">"}, count=3
        )
        consumer._observed_at = -1e9  # observed every few seconds: force the next one
        await consumer._observe_lag()
        assert (inst.consumer_lag, inst.consumer_pending) == (2, 3)
        # The stream deleted under us: no gauge update, and above all no exception.
        await client.delete(settings.command_stream)
        consumer._observed_at = -1e9
        await consumer._observe_lag()
        assert (inst.consumer_lag, inst.consumer_pending) == (2, 3)
    finally:
        await client.aclose()
        telemetry.shutdown()


async def test_lag_count_before_redis_7_stops_at_its_caps(make_settings: MakeSettings) -> None:
    """The count Redis < 7 needs runs inside Redis one entry at a time: exact below its caps,
    stopped at the entry cap or the byte cap, and nothing of the backlog reaches the daemon."""
    from maildaemon.pipeline.stream_reader import EntryCounter
    from tests.support import redis_client

    settings = make_settings()
    client = redis_client(settings.redis_master_addr)
    stream = settings.command_stream
    try:
        first = await client.xadd(stream, {"command": "x" * 1000})
        for _ in range(9):
            await client.xadd(stream, {"command": "x" * 1000})
        wide = EntryCounter(client, stream, cap=100, byte_cap=1 << 20)
        assert await wide.after(first) == 9
        assert await wide.after("0-0") == 10
        assert await EntryCounter(client, stream, cap=4, byte_cap=1 << 20).after("0-0") == 4
        # Each entry is ~1,007 bytes: the scan stops once 3,000 bytes have been read.
        assert await EntryCounter(client, stream, cap=100, byte_cap=3000).after("0-0") == 3
        assert await wide.after("99999999999999-0") == 0
    finally:
        await client.aclose()


async def test_operator_cancel_writes_the_cancelled_line(make_settings: MakeSettings) -> None:
    from maildaemon.store.operator.actions import OperatorStore
    from maildaemon.store.operator.records import Actor
    from maildaemon.store.pipeline.db import Store
    from tests.support import ingest_one

    settings = make_settings()
    store = await Store.open(settings.dsn)
    try:
        doc = command("cancel-me", send_at="2099-01-01T00:00:00Z", to=["Bob@Example.NET"])
        await ingest_one(store, doc)
        with json_log() as out:
            await OperatorStore(store.pool).cancel("cancel-me", Actor("ops@example"), "duplicate")
    finally:
        await store.close()
    [line] = [line for line in _lines(out) if line["event"] == "delivery cancelled"]
    assert line["delivery_id"] == "cancel-me" and line["source"] == "authsession"
    assert line["attempt"] == 0 and line["recipients"] == ["example.net"]
    assert "duplicate" in line["reason"]


async def test_unreachable_server_marks_the_destination_down(
    make_settings: MakeSettings,
) -> None:
    """No answer at all: mail.smtp.destination.up is 0, the failed `smtp connect` span carries
    the error, no transaction span is drawn, and the retry line says what happened."""
    from maildaemon.devstack.postgres import pick_free_port

    closed = f"127.0.0.1:{pick_free_port()}"
    settings = make_settings(smtp_addr=closed)
    reader = InMemoryMetricReader()
    spans = InMemorySpanExporter()
    telemetry = Telemetry(readers=[reader], span_processors=[SimpleSpanProcessor(spans)])
    db = Db(settings.dsn)
    with json_log() as out:
        async with daemon(settings, telemetry):
            await xadd(settings, command("nobody-home"))
            await db.wait_status("nobody-home", "queued")
            await wait_for(lambda: _has(out, "delivery retry scheduled"))
            measured = points(reader)
    assert [p.value for p in measured["mail.smtp.destination.up"]] == [0]
    finished = spans.get_finished_spans()
    [connect] = [s for s in finished if s.name == "smtp connect"]
    assert connect.status.status_code.name == "ERROR"
    assert not [s for s in finished if s.name == "smtp transaction"]
    [retry] = [line for line in _lines(out) if line["event"] == "delivery retry scheduled"]
    assert retry["attempt_status"] == "transport_failed" and retry["reason"]
