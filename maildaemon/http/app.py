"""Internal HTTP listener (aiohttp, in the daemon's loop): probes and the operator API.

This module builds the app and registers every route group itself; the groups import only
``keys`` and ``respond`` (below them), so there is no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware

from maildaemon.config import Settings
from maildaemon.contract.command import CommandPolicy
from maildaemon.http import admission, console, openapi, pacing, probes
from maildaemon.http.keys import (
    CATALOG_HASH_KEY,
    CATALOG_KEY,
    CONSOLE_KEY,
    DEV_MAILDIR_KEY,
    METRICS_KEY,
    OPERATOR_KEY,
    POLICY_KEY,
    PREFIX,
    PREVIEW_GATE_KEY,
    READINESS_KEY,
    REFUSAL_KEY,
    RETRY_KEY,
    SETTINGS_KEY,
    STORE_KEY,
    MetricsText,
    Readiness,
)
from maildaemon.http.preview_gate import PreviewGate
from maildaemon.http.respond import guarded, json_errors, read_guarded
from maildaemon.http.routes import OPERATIONS
from maildaemon.message.render import TemplateCatalog
from maildaemon.retry import RetryPolicy
from maildaemon.store.console.reads import ConsoleReads
from maildaemon.store.operator.actions import OperatorStore
from maildaemon.store.pipeline.db import Store


def _ignore(_: str) -> None:
    return None


def _no_timeout(_phase: str, _remote: str | None, _timeout: float) -> None:
    return None


def _no_pacing(_outcome: str, _limit: str) -> None:
    return None


def _add_middlewares(
    app: web.Application,
    settings: Settings,
    middlewares: tuple[Middleware, ...],
    on_timeout: Callable[[str, str | None, float], None],
    on_pacing: Callable[[str, str], None],
) -> None:
    """The request pacing before anything, the Host check, then ``middlewares``, JSON
    errors, the body read."""
    pace, refusals = pacing.request_pacing(settings, on_pacing)

    async def close_log(_: web.Application) -> None:
        refusals.close()

    app.on_cleanup.append(close_log)
    app.middlewares.append(pace)
    app.middlewares.append(
        admission.host_check(settings.http_allowed_hosts, settings.internal_http_log_interval)
    )
    app.middlewares.extend(middlewares)
    app.middlewares.append(json_errors)
    app.middlewares.append(admission.body_deadline(settings.internal_http_body_timeout, on_timeout))


def build_app(
    settings: Settings,
    store: Store,
    readiness: Readiness,
    policy: CommandPolicy | None = None,
    *,
    catalog_hash: str | None = None,
    on_refusal: Callable[[str], None] = _ignore,
    catalog: TemplateCatalog | None = None,
    dev_maildir: Path | None = None,
    metrics: MetricsText | None = None,
    middlewares: tuple[Middleware, ...] = (),
    on_timeout: Callable[[str, str | None, float], None] = _no_timeout,
    on_pacing: Callable[[str, str], None] = _no_pacing,
) -> web.Application:
    """The listener's app over ``store`` (the operator API's own pool); ``metrics`` serves
    /metrics. The request pacing (``on_pacing`` hears of each request delayed or refused)
    and the Host check run first of all, then ``middlewares`` (server spans), the JSON
    errors and the body deadline (``on_timeout`` hears of a body too slow)."""
    app = web.Application(client_max_size=settings.internal_http_max_body_bytes)
    _add_middlewares(app, settings, middlewares, on_timeout, on_pacing)
    app[STORE_KEY] = store
    app[SETTINGS_KEY] = settings
    app[READINESS_KEY] = readiness
    app[REFUSAL_KEY] = on_refusal
    if policy is not None:
        app[POLICY_KEY] = policy
    if catalog_hash is not None:
        app[CATALOG_HASH_KEY] = catalog_hash
    app[OPERATOR_KEY] = OperatorStore(store.pool)
    app[CONSOLE_KEY] = ConsoleReads(store.pool)
    if catalog is not None:
        app[CATALOG_KEY] = catalog
    if dev_maildir is not None:  # only under `maildaemon dev`: the dev inbox
        app[DEV_MAILDIR_KEY] = dev_maildir
    app[RETRY_KEY] = RetryPolicy(
        settings.retry_ladder, settings.retry_jitter, settings.unknown_outcome_policy
    )
    app[PREVIEW_GATE_KEY] = PreviewGate(
        settings.internal_http_preview_rate, settings.internal_http_preview_burst
    )
    for op in OPERATIONS:
        # Actions (POST) need an operator token; reads need the read token when one is set.
        if op.method == "post":
            handler = guarded(op.handler)
        elif op.path.startswith(PREFIX):
            handler = read_guarded(op.handler)
        else:
            handler = op.handler
        app.router.add_route(op.method.upper(), op.path, handler)
    app[probes.PROBE_CACHE_KEY] = probes.ProbeCache()
    app.router.add_get("/readyz", probes.readyz)
    if metrics is not None:
        reused: MetricsText = probes.ReusedText(metrics)  # rendered once a second at most
        app[METRICS_KEY] = reused
        app.router.add_get("/metrics", probes.metrics)
    app.router.add_get(f"{PREFIX}/openapi.json", openapi.serve)
    console.register(app)
    return app
