"""Destination probe: while the SMTP destination is down, hold the work and probe it.

When a worker finds the destination unreachable (``sending.destination``), the probe logs
``destination down``, gives every claimed job not yet begun back to the store (so no lease
runs out and no delivery is charged an attempt), and opens a test session with backoff
(``retry.Backoff``, capped at ``PROBE_CAP`` so a returning server is seen within about a
second). The first session that opens marks the destination up, logs ``destination up`` and
wakes the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from maildaemon.config import Settings
from maildaemon.errors import StoreUnavailable, TransportError
from maildaemon.logs import event
from maildaemon.pipeline.jobs import JobQueue
from maildaemon.pipeline.lifecycle import Lifecycle, unavailable
from maildaemon.retry import Backoff
from maildaemon.sending.destination import Destination, is_unreachable
from maildaemon.sending.smtp import SmtpConnection
from maildaemon.store.pipeline.db import Store
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.probe")
PROBE_CAP = 1.0  # seconds: the longest wait between two probes


class DestinationProbe(Lifecycle):
    def __init__(
        self,
        settings: Settings,
        context: ssl.SSLContext,
        destination: Destination,
        queue: JobQueue,
        store: Store,
        instruments: Instruments,
    ) -> None:
        super().__init__()
        self._s = settings
        self._context = context
        self._dest = destination
        self._queue = queue
        self._store = store
        self._inst = instruments

    async def run(self) -> None:
        while not self.stopping:
            down = asyncio.ensure_future(self._dest.wait_down())
            stop = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({down, stop}, return_when=asyncio.FIRST_COMPLETED)
            down.cancel()
            stop.cancel()
            if self.stopping:
                return
            await self._while_down()

    async def _while_down(self) -> None:
        exc = self._dest.last_error
        self._inst.destination_up = 0
        self._inst.destination_changes.add(1, {"state": "down"})
        event(
            log,
            "destination down",
            logging.WARNING,
            destination=self._dest.name,
            stage=exc.stage if exc else None,
            error_class=type(exc).__name__ if exc else None,
            error=str(exc) if exc else None,
            reply_code=exc.code if exc else None,
            reply_text=exc.text if exc else None,
        )
        backoff = Backoff(cap=PROBE_CAP)
        probes = 0
        while not self.stopping:
            await self._hand_back()
            await self.sleep(backoff.next())
            if self.stopping:
                return
            probes += 1
            if await self._probe():
                break
        else:
            return
        await self._hand_back()  # given back by workers while the last probe ran
        down_for = self._dest.mark_up()
        self._inst.destination_up = 1
        self._inst.destination_changes.add(1, {"state": "up"})
        event(
            log,
            "destination up",
            destination=self._dest.name,
            down_for_s=round(down_for, 2),
            probes=probes,
        )

    async def _probe(self) -> bool:
        """Open one session; True when the destination answers again."""
        conn = SmtpConnection(self._s, self._context)
        try:
            async with asyncio.timeout(self._s.smtp_timeout):
                await conn.open()
        except TimeoutError:
            conn.abort()
            return False
        except TransportError as exc:
            conn.abort()
            if is_unreachable(exc):
                self._dest.last_error = exc
                return False
            return True  # reachable; what it refuses (e.g. AUTH) the attempts will record
        await conn.close()
        return True

    async def _hand_back(self) -> None:
        """Give the claims of jobs not begun back to the store: due again, no attempt."""
        jobs = self._queue.take_unstarted()
        if not jobs:
            return
        try:
            released = await self._store.release(j.claim for j in jobs)
        except StoreUnavailable as exc:  # tried again with the next probe; else leases run out
            unavailable(log, self._inst, "probe", exc, PROBE_CAP)
            return
        event(log, "claims held for the destination released", count=released)
