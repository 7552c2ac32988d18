"""Liveness and readiness probes: /healthz answers while the process runs; /readyz says
whether migrations are applied, workers run, PostgreSQL answers and takes writes (not
read-only) and Redis answers, and which
template catalog (content hash) the process loaded. /metrics (when
MAIL_METRICS_PROMETHEUS=true) serves the metrics in Prometheus text format, rendered at
most once a second."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from maildaemon.errors import StoreReadOnly, StoreUnavailable
from maildaemon.http.keys import (
    CATALOG_HASH_KEY,
    METRICS_KEY,
    READINESS_KEY,
    MetricsText,
    Readiness,
)

PROMETHEUS_TEXT = "text/plain; version=0.0.4"
PROBE_REUSE_S = 1.0


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _probe_all(checks: dict[str, Callable[[], Awaitable[object]]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, probe in checks.items():
        try:
            await asyncio.wait_for(probe(), 2.0)
            found[name] = "ok"
        except StoreReadOnly:
            found[name] = "read-only"
        except (StoreUnavailable, OSError, TimeoutError, Exception) as exc:
            found[name] = f"unavailable: {type(exc).__name__}"
    return found


class ProbeCache:
    """The dependency checks of /readyz, shared: requests that come together wait for one
    round of checks, and a result is reused for ``PROBE_REUSE_S``, so a flood of /readyz
    costs PostgreSQL and Redis one query a second, not one per request."""

    def __init__(self) -> None:
        self._round: asyncio.Task[dict[str, str]] | None = None
        self._stamp = 0.0

    async def checks(self, state: Readiness) -> dict[str, str]:
        now = time.monotonic()
        if self._round is None or (self._round.done() and now - self._stamp > PROBE_REUSE_S):
            self._round = asyncio.ensure_future(_probe_all(dict(state.checks)))
            self._stamp = now
        return dict(await asyncio.shield(self._round))


PROBE_CACHE_KEY = web.AppKey("probe_cache", ProbeCache)


class ReusedText:
    """``render`` at most once per ``seconds``: rendering the metrics costs milliseconds of
    the event loop (about 10 ms for the daemon's families), so a flood of /metrics costs
    one rendering a second; a scrape sees values at most that old."""

    def __init__(self, render: MetricsText, seconds: float = PROBE_REUSE_S) -> None:
        self._render = render
        self._seconds = seconds
        self._stamp = -math.inf
        self._text = b""

    def __call__(self) -> bytes:
        now = time.monotonic()
        if now - self._stamp >= self._seconds:
            self._text = self._render()
            self._stamp = now
        return self._text


async def readyz(request: web.Request) -> web.Response:
    state = request.app[READINESS_KEY]
    checks: dict[str, str] = {}
    if state.shutting_down:
        checks["process"] = "shutting down"
    checks["migrations"] = "ok" if state.migrations_applied else "not applied"
    checks["workers"] = "ok" if state.workers_running else "not running"
    checks.update(await request.app[PROBE_CACHE_KEY].checks(state))
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
