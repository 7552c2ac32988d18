"""Replica heartbeat: records in ``mail.replicas`` what this daemon judges commands by (the
loaded catalog's content hash and the intake policy's fingerprint), refreshed every few
seconds and removed on a clean stop. The CLI reads it to judge replays as the daemon will."""

from __future__ import annotations

import contextlib
import logging

from maildaemon.errors import StoreUnavailable
from maildaemon.logs import event
from maildaemon.pipeline.lifecycle import Periodic
from maildaemon.store import replicas
from maildaemon.store.pipeline.db import Store
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.heartbeat")


class ReplicaHeartbeat(Periodic):
    component = "heartbeat"

    def __init__(self, store: Store, me: replicas.Identity, instruments: Instruments) -> None:
        super().__init__(log, instruments, replicas.HEARTBEAT_INTERVAL)
        self._store = store
        self._me = me
        self._starting = True

    def started(self) -> None:
        event(
            log,
            "replica heartbeat started",
            consumer=self._me.consumer_name,
            catalog_hash=self._me.catalog_hash,
            policy_hash=self._me.policy_hash,
        )

    async def tick(self) -> float:
        await replicas.beat(self._store.pool, self._me, starting=self._starting)
        self._starting = False
        return self.interval

    async def finish(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await replicas.leave(self._store.pool, self._me.consumer_name)

    def stopped(self) -> None:
        event(log, "replica heartbeat stopped", consumer=self._me.consumer_name)
