"""The metrics the runbook names are recorded by a running daemon."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from maildaemon.app import App
from maildaemon.config import Settings
from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.telemetry import Telemetry
from tests.support import Db, command, wait_for, xadd

MakeSettings = Callable[..., Settings]


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    out: dict[str, list[Any]] = {}
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


async def test_runbook_metrics_are_recorded(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    import asyncio

    smtp_sink.behaviour.rcpt_replies["gone@example.com"] = ["550 5.1.1 unknown user"]
    settings = make_settings(retry_ladder="0.1s", retry_jitter=0)
    reader = InMemoryMetricReader()
    app = App(settings, Telemetry(readers=[reader]))
    task = asyncio.create_task(app.run())
    db = Db(settings.dsn)
    try:
        await wait_for(lambda: _ready(app))
        await xadd(
            settings, command("m-ok"), command("m-gone", to=["gone@example.com"]), "not json at all"
        )
        await db.wait_status("m-ok", "sent")
        await db.wait_status("m-gone", "suppressed")
        await wait_for(lambda: db.fetchval("SELECT count(*) FROM mail.malformed_commands"))
        points = _points(reader)
    finally:
        app.request_stop()
        assert await task == 0
    for name in (
        "mail.stream_commands.malformed",
        "mail.attempt.outcomes",
        "mail.provider.send.duration_ms",
        "mail.delivery.suppressed",
        "mail.attempt_schedule.depth",
        "mail.attempt_schedule.oldest_age_ms",
    ):
        assert name in points, (name, sorted(points))
    outcomes = {p.attributes["status"]: p.value for p in points["mail.attempt.outcomes"]}
    assert outcomes.get("sent") == 1 and outcomes.get("provider_rejected") == 1
    malformed = {
        p.attributes["failure_code"]: p.value for p in points["mail.stream_commands.malformed"]
    }
    assert malformed == {"invalid_json": 1}


async def _ready(app: App) -> bool:
    return app.readiness.workers_running
