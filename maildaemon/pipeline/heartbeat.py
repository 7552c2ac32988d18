"""Replica heartbeat: records in ``mail.replicas`` what this daemon judges commands by (the
loaded catalog's content hash and the intake policy's fingerprint), refreshed every few
seconds and removed on a clean stop. The CLI reads it to judge replays as the daemon will."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from maildaemon.errors import StoreUnavailable
from maildaemon.logs import event
from maildaemon.retry import Backoff
from maildaemon.store import replicas
from maildaemon.store.db import Store
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.heartbeat")


class ReplicaHeartbeat:
    def __init__(self, store: Store, me: replicas.Identity, instruments: Instruments) -> None:
        self._store = store
        self._me = me
        self._inst = instruments
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        event(
            log,
            "replica heartbeat started",
            consumer=self._me.consumer_name,
            catalog_hash=self._me.catalog_hash,
            policy_hash=self._me.policy_hash,
        )
        starting, backoff = True, Backoff()
        while not self._stopping.is_set():
            wait = replicas.HEARTBEAT_INTERVAL
            try:
                await replicas.beat(self._store.pool, self._me, starting=starting)
                starting, backoff = False, Backoff()
            except StoreUnavailable as exc:
                self._inst.store_unavailable.add(1, {"component": "heartbeat"})
                wait = min(wait, backoff.next())
                event(
                    log,
                    "postgres unavailable",
                    logging.WARNING,
                    component="heartbeat",
                    error=str(exc),
                    retry_in_s=round(wait, 2),
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)
        with contextlib.suppress(StoreUnavailable):
            await replicas.leave(self._store.pool, self._me.consumer_name)
        event(log, "replica heartbeat stopped", consumer=self._me.consumer_name)
