"""Internal HTTP listener (aiohttp, in the daemon's loop): probes and the operator API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from maildaemon.commands import CommandPolicy
from maildaemon.config import Settings
from maildaemon.errors import StoreUnavailable
from maildaemon.store.db import Store

log = logging.getLogger("maildaemon.api")


@dataclass
class Readiness:
    """What /readyz reports; the app flips these as it starts and stops."""

    migrations_applied: bool = False
    workers_running: bool = False
    shutting_down: bool = False
    checks: dict[str, Callable[[], Awaitable[object]]] = field(default_factory=dict)


STORE_KEY = web.AppKey("store", Store)
SETTINGS_KEY = web.AppKey("settings", Settings)
READINESS_KEY = web.AppKey("readiness", Readiness)
# The daemon's intake policy (its loaded template catalog): malformed-command replay uses it.
POLICY_KEY = web.AppKey("command_policy", CommandPolicy)


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
    ready = all(v == "ok" for v in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


def build_app(
    settings: Settings, store: Store, readiness: Readiness, policy: CommandPolicy | None = None
) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)
    app[STORE_KEY] = store
    app[SETTINGS_KEY] = settings
    app[READINESS_KEY] = readiness
    if policy is not None:
        app[POLICY_KEY] = policy
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    from maildaemon import api_routes

    api_routes.register(app)
    return app
