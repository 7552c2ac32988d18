"""The webhooks' instruments (``mail.webhook.*``), part of ``telemetry.Instruments``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation


@dataclass
class WebhookInstruments:
    """Per endpoint (label ``endpoint``: its id): attempts delivered and failed, their
    latency, endpoints disabled; the backlog gauges are set by the dispatcher's figures
    pass (endpoint id -> (waiting, oldest age s, enabled))."""

    sent: metrics.Counter
    failed: metrics.Counter
    latency_ms: metrics.Histogram
    disabled: metrics.Counter
    backlog: dict[int, tuple[int, float, int]]


def webhook_instruments(meter: metrics.Meter) -> WebhookInstruments:
    inst = WebhookInstruments(
        sent=meter.create_counter(
            "mail.webhook.sent", description="Webhook attempts the endpoint took (2xx)"
        ),
        failed=meter.create_counter(
            "mail.webhook.failed",
            description="Webhook attempts that failed, by endpoint and reason (status, "
            "timeout, connect, refused_target, redirect)",
        ),
        latency_ms=meter.create_histogram(
            "mail.webhook.latency_ms", unit="ms", description="One webhook attempt's duration"
        ),
        disabled=meter.create_counter(
            "mail.webhook.endpoints_disabled",
            description="Endpoints disabled after failing their whole retry schedule",
        ),
        backlog={},
    )
    inst.disabled.add(0)
    table = inst.backlog

    def observe(pick: Callable[[tuple[int, float, int]], float]) -> Callable[..., Any]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            for endpoint, figures in list(table.items()):
                yield Observation(pick(figures), {"endpoint": str(endpoint)})

        return callback

    meter.create_observable_gauge(
        "mail.webhook.backlog",
        callbacks=[observe(lambda f: f[0])],
        description="Events waiting for an endpoint",
    )
    meter.create_observable_gauge(
        "mail.webhook.backlog_age_s",
        callbacks=[observe(lambda f: f[1])],
        description="How long the oldest event waiting for an endpoint has waited",
    )
    meter.create_observable_gauge(
        "mail.webhook.endpoint_enabled",
        callbacks=[observe(lambda f: f[2])],
        description="1 while an endpoint is enabled, 0 once disabled",
    )
    return inst
