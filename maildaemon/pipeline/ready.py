"""The one `ready` line: logged once the stream consumer reads and the scheduler claims."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from maildaemon.config import Settings
from maildaemon.logs import event
from maildaemon.telemetry import Telemetry

log = logging.getLogger("maildaemon.app")


async def announce_ready(
    settings: Settings,
    telemetry: Telemetry,
    started: Sequence[asyncio.Event],
    stop: asyncio.Event,
    http_port: int | None,
) -> bool:
    """Wait until every ``started`` event is set, then log `ready`; False when ``stop`` came
    first (nothing logged)."""
    everything = asyncio.gather(*(e.wait() for e in started))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait((everything, stopping), return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not everything.done():
        everything.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await everything
        return False
    event(
        log,
        "ready",
        http_port=http_port,
        consumer=settings.consumer_name,
        workers=settings.attempt_worker_concurrency,
        smtp_mode=settings.smtp_mode,
        metrics="/metrics" if telemetry.prometheus is not None else None,
        traces_exported=telemetry.exporting_traces,
    )
    return True
