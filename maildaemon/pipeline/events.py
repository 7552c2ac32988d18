"""Event publisher: outcome events from the outbox table to the Redis event stream.

Every recorded outcome writes its event into ``mail.outbox`` in the same transaction
(``store.db.write_outcomes``). This loop moves them to ``MAIL_EVENT_STREAM`` in id order —
one replica at a time, at least once: a batch is deleted only after Redis took it, so a
Redis outage delays events and never loses them. The result writer wakes it after each
commit; otherwise it looks every ``MAIL_EVENT_PUBLISH_INTERVAL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from maildaemon.config import Settings
from maildaemon.errors import StoreUnavailable
from maildaemon.logs import event
from maildaemon.retry import Backoff
from maildaemon.store.db import Store
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.events")
_BATCH = 500


class EventPublisher:
    def __init__(
        self, settings: Settings, store: Store, redis: aioredis.Redis, instruments: Instruments
    ) -> None:
        self._s = settings
        self._store = store
        self._redis = redis
        self._inst = instruments
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Publish what is in the outbox now (one more pass), then stop."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        backoff = Backoff()
        failing = False
        while True:
            self._wake.clear()
            try:
                published = await self.publish_once()
            except (StoreUnavailable, RedisError) as exc:
                self._inst.events_unpublished.add(1)
                event(
                    log,
                    "outcome events not published",
                    logging.WARNING,
                    error=repr(exc),
                    retry_in_s=round(backoff.peek(), 3),
                )
                failing = True
                if self._stopping.is_set():
                    return  # the events stay in the outbox for the next start
                await self._sleep(backoff.next(), interruptible=False)
                continue
            if failing:
                event(log, "outcome events publishing again")
                failing = False
            backoff.reset()
            if published >= _BATCH:
                continue
            if self._stopping.is_set():
                return
            await self._sleep(self._s.event_publish_interval, interruptible=True)

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

    async def _sleep(self, seconds: float, *, interruptible: bool) -> None:
        waiter = self._wake if interruptible else self._stopping
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter.wait(), seconds)
