"""Retention worker: removes what has outlived its retention period, in bounded batches.

Expired idempotency reservations, terminal deliveries (with their attempts, payloads and
dead letters) past MAIL_DELIVERY_RETENTION, malformed-command records past
MAIL_MALFORMED_RETENTION, and expired suppressions. A delivery that is not terminal is
never deleted.
"""

from __future__ import annotations

import logging

from maildaemon.config import Settings
from maildaemon.logs import event
from maildaemon.pipeline.lifecycle import Periodic
from maildaemon.store.pipeline.db import Store
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.retention")


class RetentionWorker(Periodic):
    component = "retention"

    def __init__(self, settings: Settings, store: Store, instruments: Instruments) -> None:
        super().__init__(log, instruments, settings.retention_interval)
        self._s = settings
        self._store = store

    def started(self) -> None:
        event(
            log,
            "retention worker started",
            interval_s=self._s.retention_interval,
            delivery_retention_s=self._s.delivery_retention,
        )

    async def tick(self) -> float:
        await self.run_once()
        return self.interval

    def stopped(self) -> None:
        event(log, "retention worker stopped")

    async def run_once(self) -> dict[str, int]:
        """Purge until nothing is left past its period (each batch a short statement)."""
        total: dict[str, int] = {}
        while not self.stopping:
            deleted = await self._store.purge(
                self._s.retention_batch_size,
                self._s.delivery_retention,
                self._s.malformed_retention,
                self._s.bounce_report_retention,
            )
            for kind, count in deleted.items():
                total[kind] = total.get(kind, 0) + count
            if max(deleted.values()) < self._s.retention_batch_size:
                break
        if any(total.values()):
            event(log, "retention pass", **{f"deleted_{k}": v for k, v in total.items()})
        return total
