"""Event publisher: outcome events from the outbox table to the Redis event stream.

Every recorded outcome writes its event into ``mail.outbox`` in the same transaction
(``store.db.write_outcomes``). This loop moves them to ``MAIL_EVENT_STREAM`` in id order —
one replica at a time, at least once: a batch is deleted only after Redis took it, so a
Redis outage delays events and never loses them. The result writer wakes it after each
commit; wake-ups are coalesced (at most one pass per ``COALESCE`` seconds, so a busy writer
costs one publish transaction per pass, not one per commit); otherwise it looks every
``MAIL_EVENT_PUBLISH_INTERVAL``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from maildaemon.config import Settings
from maildaemon.logs import event
from maildaemon.pipeline.lifecycle import DEPENDENCY_DOWN, Periodic, RedisClient, unavailable
from maildaemon.store.pipeline.db import Store
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.events")
_BATCH = 500
COALESCE = 0.05  # seconds: the shortest time between two passes a wake-up can start


class EventPublisher(Periodic):
    component = "events"
    wakeable = True

    def __init__(
        self,
        settings: Settings,
        store: Store,
        redis: RedisClient,
        instruments: Instruments,
        webhooks_queued: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(log, instruments, settings.event_publish_interval)
        self._s = settings
        self._store = store
        self._redis = redis
        self._last_pass = -COALESCE
        # Wakes this process's webhook dispatcher when a batch queued webhooks (other
        # replicas' dispatchers find them on their next poll).
        self._webhooks_queued = webhooks_queued

    async def tick(self) -> float:
        early = self._last_pass + COALESCE - time.monotonic()
        if early > 0:  # woken again soon after a pass: let more commits join this one
            await self.sleep(early)
        self._last_pass = time.monotonic()
        published = await self.publish_once()
        return 0.0 if published >= _BATCH else self.interval

    def down(self, exc: Exception, retry_in_s: float) -> None:
        self._inst.events_unpublished.add(1)
        unavailable(
            log, self._inst, self.component, exc, retry_in_s, message="outcome events not published"
        )

    def recovered(self) -> None:
        event(log, "outcome events publishing again")

    async def finish(self) -> None:
        """Publish what is in the outbox now; what cannot go stays for the next start."""
        with contextlib.suppress(*DEPENDENCY_DOWN):
            while await self.publish_once() >= _BATCH:
                pass

    async def publish_once(self) -> int:
        """Move one batch from the outbox to the stream; returns how many went."""
        async with self._store.outbox_batch(_BATCH, self._webhooks_queued) as batch:
            if batch:
                await self._xadd(batch)
        if batch:
            self._inst.events_published.add(len(batch))
        return len(batch)

    async def _xadd(self, batch: list[dict[str, Any]]) -> None:
        maxlen = self._s.event_stream_maxlen or None
        async with self._redis.pipeline(transaction=False) as pipe:
            for fields in batch:
                pipe.xadd(
                    self._s.event_stream,
                    fields,  # type: ignore[arg-type]
                    maxlen=maxlen,
                    approximate=True,
                )
            await pipe.execute()
