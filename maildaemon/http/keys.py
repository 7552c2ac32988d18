"""What the internal HTTP app holds: its typed keys, the path prefix and readiness state."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from maildaemon.config import Settings
from maildaemon.contract.command import CommandPolicy
from maildaemon.http.preview_gate import PreviewGate
from maildaemon.message.render import TemplateCatalog
from maildaemon.retry import RetryPolicy
from maildaemon.store.console.reads import ConsoleReads
from maildaemon.store.operator.actions import OperatorStore
from maildaemon.store.pipeline.db import Store

PREFIX = "/api/v1/internal"


@dataclass
class Readiness:
    """What /readyz reports; the app flips these as it starts and stops."""

    migrations_applied: bool = False
    workers_running: bool = False
    shutting_down: bool = False
    checks: dict[str, Callable[[], Awaitable[object]]] = field(default_factory=dict)
    # States the daemon knows without asking anyone: "ok", or what is wrong.
    conditions: dict[str, Callable[[], str]] = field(default_factory=dict)


STORE_KEY = web.AppKey("store", Store)
SETTINGS_KEY = web.AppKey("settings", Settings)
READINESS_KEY = web.AppKey("readiness", Readiness)
# The daemon's intake policy (its loaded template catalog): malformed-command replay uses it.
POLICY_KEY = web.AppKey("command_policy", CommandPolicy)
OPERATOR_KEY = web.AppKey("operator_store", OperatorStore)
# The content hash of the template catalog this daemon loaded (shown by /readyz).
CATALOG_HASH_KEY = web.AppKey("catalog_hash", str)
# Counts a refused request by reason (the mail.api.refusals metric).
REFUSAL_KEY: web.AppKey[Callable[[str], None]] = web.AppKey("on_refusal")
RETRY_KEY = web.AppKey("retry_policy", RetryPolicy)
# Added for the operator console: its reads, the loaded template catalog (preview) and,
# under `maildaemon dev` only, the SMTP sink's maildir (the dev inbox).
CONSOLE_KEY = web.AppKey("console_reads", ConsoleReads)
CATALOG_KEY = web.AppKey("template_catalog", TemplateCatalog)
DEV_MAILDIR_KEY = web.AppKey("dev_maildir", Path)
# Template previews: rendered in a thread, a few at once, rate-limited for the listener.
PREVIEW_GATE_KEY = web.AppKey("preview_gate", PreviewGate)
# Renders the daemon's metrics in Prometheus text format (set when /metrics is served).
MetricsText = Callable[[], bytes]
METRICS_KEY: web.AppKey[MetricsText] = web.AppKey("metrics_text")
