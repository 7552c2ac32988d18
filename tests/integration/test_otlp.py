"""The OTLP exporters configured from the standard variables reach a real receiver: the
daemon exports over OTLP/HTTP (protobuf) to a small aiohttp server that decodes it."""

from __future__ import annotations

import asyncio
import gzip
import secrets
import threading
from collections.abc import Callable, Iterator

import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from maildaemon.config import Settings
from maildaemon.devstack.postgres import pick_free_port
from maildaemon.devstack.smtp_sink import SmtpSink
from tests.support import Db, command, running_app, xadd

MakeSettings = Callable[..., Settings]


class Receiver:
    """An OTLP/HTTP receiver in its own thread (the daemon flushes from its loop's thread
    at exit, synchronously, so the receiver must not share that loop)."""

    def __init__(self) -> None:
        self.port = pick_free_port()
        self.spans: list[tuple[str, bytes, bytes]] = []  # (name, trace id, parent span id)
        self.metrics: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    async def _body(self, request: web.Request) -> bytes:
        assert request.content_type == "application/x-protobuf"
        body = await request.read()
        return gzip.decompress(body) if request.headers.get("Content-Encoding") == "gzip" else body

    async def _traces(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest.FromString(await self._body(request))
        for resource in message.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend((s.name, s.trace_id, s.parent_span_id) for s in scope.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def _metrics(self, request: web.Request) -> web.Response:
        message = ExportMetricsServiceRequest.FromString(await self._body(request))
        for resource in message.resource_metrics:
            for scope in resource.scope_metrics:
                self.metrics.update(m.name for m in scope.metrics)
        return web.Response(body=b"", content_type="application/x-protobuf")

    def __enter__(self) -> Receiver:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    with Receiver() as server:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "500")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "maildaemon-otlp-test")
        yield server


async def test_spans_and_metrics_reach_an_otlp_receiver(
    make_settings: MakeSettings, smtp_sink: SmtpSink, receiver: Receiver
) -> None:
    settings = make_settings()
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    async with running_app(settings):
        await xadd(settings, command("otlp-1", traceparent=f"00-{trace_id}-{parent_id}-01"))
        await Db(settings.dsn).wait_status("otlp-1", "sent")
    # The daemon has stopped: its shutdown flushed both exporters to the receiver.
    ours = [(n, p) for n, t, p in receiver.spans if t == bytes.fromhex(trace_id)]
    names = {n for n, _ in ours}
    assert {"intake command", "delivery attempt", "smtp transaction", "smtp connect"} <= names
    assert ("intake command", bytes.fromhex(parent_id)) in ours
    assert {"mail.attempt.outcomes", "mail.provider.send.duration_ms"} <= receiver.metrics


async def test_sampler_from_the_standard_variable(
    make_settings: MakeSettings,
    smtp_sink: SmtpSink,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OTEL_TRACES_SAMPLER=always_off: nothing is exported, the delivery still goes out."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    settings = make_settings()
    async with running_app(settings):
        await xadd(settings, command("unsampled-1"))
        await Db(settings.dsn).wait_status("unsampled-1", "sent")
    assert receiver.spans == []
    assert "mail.attempt.outcomes" in receiver.metrics
