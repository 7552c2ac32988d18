"""Event publisher: outcome events from the outbox table to the Redis event stream.

Every recorded outcome writes its event into ``mail.outbox`` in the same transaction
(``store.db.write_outcomes``). This loop moves them to ``MAIL_EVENT_STREAM`` in id order —
one replica at a time, at least once: a batch is deleted only after Redis took it, so a
Redis outage delays events and never loses them. The result writer wakes it after each
commit; otherwise it looks every ``MAIL_EVENT_PUBLISH_INTERVAL``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis

from maildaemon.config import Settings
from maildaemon.logs import event
from maildaemon.pipeline.lifecycle import DEPENDENCY_DOWN, Periodic, unavailable
from maildaemon.store.db import Store
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.events")
_BATCH = 500


class EventPublisher(Periodic):
    component = "events"
    wakeable = True

    def __init__(
        self, settings: Settings, store: Store, redis: aioredis.Redis, instruments: Instruments
    ) -> None:
        super().__init__(log, instruments, settings.event_publish_interval)
        self._s = settings
        self._store = store
        self._redis = redis

    async def tick(self) -> float:
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
        async with self._store.outbox_batch(_BATCH) as batch:
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
