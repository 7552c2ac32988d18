"""Retention worker: removes what has outlived its retention period, in bounded batches.

Expired idempotency reservations, terminal deliveries (with their attempts, payloads and
dead letters) past MAIL_DELIVERY_RETENTION, malformed-command records past
MAIL_MALFORMED_RETENTION, and expired suppressions. A delivery that is not terminal is
never deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from maildaemon.config import Settings
from maildaemon.errors import StoreUnavailable
from maildaemon.logs import event
from maildaemon.store.db import Store

log = logging.getLogger("maildaemon.retention")


class RetentionWorker:
    def __init__(self, settings: Settings, store: Store) -> None:
        self._s = settings
        self._store = store
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        event(
            log,
            "retention worker started",
            interval_s=self._s.retention_interval,
            delivery_retention_s=self._s.delivery_retention,
        )
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except StoreUnavailable as exc:
                event(
                    log,
                    "postgres unavailable",
                    logging.WARNING,
                    component="retention",
                    error=str(exc),
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._s.retention_interval)
        event(log, "retention worker stopped")

    async def run_once(self) -> dict[str, int]:
        """Purge until nothing is left past its period (each batch a short statement)."""
        total: dict[str, int] = {}
        while not self._stopping.is_set():
            deleted = await self._store.purge(
                self._s.retention_batch_size,
                self._s.delivery_retention,
                self._s.malformed_retention,
            )
            for kind, count in deleted.items():
                total[kind] = total.get(kind, 0) + count
            if max(deleted.values()) < self._s.retention_batch_size:
                break
        if any(total.values()):
            event(log, "retention pass", **{f"deleted_{k}": v for k, v in total.items()})
        return total
