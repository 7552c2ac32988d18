"""Liveness and readiness probes: /healthz answers while the process runs; /readyz says
whether migrations are applied, workers run and PostgreSQL and Redis answer, and which
template catalog (content hash) the process loaded. /metrics (when
MAIL_METRICS_PROMETHEUS=true) serves the metrics in Prometheus text format."""

from __future__ import annotations

import asyncio

from aiohttp import web

from maildaemon.errors import StoreUnavailable
from maildaemon.http.keys import CATALOG_HASH_KEY, METRICS_KEY, READINESS_KEY

PROMETHEUS_TEXT = "text/plain; version=0.0.4"


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[READINESS_KEY]
    checks: dict[str, str] = {}
    if state.shutting_down:
        checks["process"] = "shutting down"
    checks["migrations"] = "ok" if state.migrations_applied else "not applied"
    checks["workers"] = "ok" if state.workers_running else "not running"
    for name, probe in state.checks.items():
        try:
            await asyncio.wait_for(probe(), 2.0)
            checks[name] = "ok"
        except (StoreUnavailable, OSError, TimeoutError, Exception) as exc:
            checks[name] = f"unavailable: {type(exc).__name__}"
    for name, condition in state.conditions.items():
        checks[name] = condition()
    ready = all(v == "ok" for v in checks.values())
    return web.json_response(
        {
            "status": "ready" if ready else "not ready",
            "checks": checks,
            # The content hash of the template catalog this process loaded and renders from.
            "catalog_hash": request.app.get(CATALOG_HASH_KEY),
        },
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    """The metrics as the exporters hold them: no query runs for a scrape."""
    body = request.app[METRICS_KEY]()
    return web.Response(body=body, content_type=PROMETHEUS_TEXT, charset="utf-8")
