"""The one shape of the daemon's long-running components, and the one way they meet a
dependency that is down.

``Lifecycle`` holds a component's stop event and a wake-up: ``stop()``, ``wake()``, and
``sleep()`` that a stop (and, when asked, a wake-up) cuts short. ``Periodic`` is a
component made of one ``tick()`` repeated until stopped: start line, tick, sleep for what
the tick asked (or for the back-off when PostgreSQL or Redis is down), one last
``finish()``, stop line. ``unavailable()`` is the warn-and-back-off line every component
writes when PostgreSQL or Redis is gone: one event name per dependency, the component, the
error and the wait, and the matching counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import (
    AskError,
    ClusterError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)

from maildaemon.errors import StoreUnavailable
from maildaemon.logs import event
from maildaemon.retry import Backoff
from maildaemon.telemetry import Instruments

# The client every component takes: one Redis (direct or through Sentinel) or a Cluster.
RedisClient = aioredis.Redis | aioredis.RedisCluster
# What a Redis call may raise when Redis is down or moving (a Cluster's slots uncovered
# during a failover raise RedisClusterException, which is not a RedisError).
REDIS_DOWN: tuple[type[Exception], ...] = (RedisError, RedisClusterException)
_MOVING_REPLIES = ("UNBLOCKED", "CLUSTERDOWN", "TRYAGAIN", "MOVED", "ASK", "LOADING", "MASTERDOWN")


def redis_moving(exc: Exception) -> bool:
    """Whether an error reply means "Redis is changing, ask again soon" rather than a
    fault of the request: a demoted master (READONLY), a blocked call cut by a failover
    (UNBLOCKED), a Cluster slot without a master (CLUSTERDOWN) or migrating (TRYAGAIN, a
    MOVED/ASK redis-py did not follow), a server still loading its data."""
    if isinstance(exc, (ReadOnlyError, ClusterError, AskError, TryAgainError)):
        return True
    return isinstance(exc, RedisError) and str(exc).startswith(_MOVING_REPLIES)


# What a tick may raise that means "a dependency is down, try again later".
DEPENDENCY_DOWN: tuple[type[Exception], ...] = (StoreUnavailable, *REDIS_DOWN)
_EVENT_NAMES = {"postgres": "postgres unavailable", "redis": "redis unavailable"}


def unavailable(
    log: logging.Logger,
    inst: Instruments,
    component: str,
    exc: Exception,
    retry_in_s: float,
    *,
    message: str | None = None,
    **fields: Any,
) -> None:
    """Count and log that ``component`` found PostgreSQL (a ``StoreUnavailable``) or Redis
    (a ``RedisError``) down and will try again in ``retry_in_s`` seconds."""
    if isinstance(exc, REDIS_DOWN):
        inst.redis_unavailable.add(1, {"component": component})
        name, error = _EVENT_NAMES["redis"], repr(exc)
    else:
        inst.store_unavailable.add(1, {"component": component})
        name, error = _EVENT_NAMES["postgres"], str(exc)
    event(
        log,
        message or name,
        logging.WARNING,
        component=component,
        error=error,
        retry_in_s=round(retry_in_s, 3),
        **fields,
    )


async def first_of(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class Lifecycle:
    """A stop event and a wake-up, and sleeps that either cuts short."""

    def __init__(self) -> None:
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def sleep(self, seconds: float, *, wakeable: bool = False) -> None:
        """Wait up to ``seconds``; a stop ends the wait, and with ``wakeable`` a wake-up
        does too (and is consumed)."""
        if wakeable:
            if seconds > 0 and not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), seconds)
            self._wake.clear()
        elif seconds > 0 and not self.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), seconds)


class Periodic(Lifecycle):
    """One ``tick()`` after another until stopped.

    ``tick()`` returns how long to sleep before the next one; a tick that raises one of
    ``DEPENDENCY_DOWN`` is logged by ``down()`` and the next waits for the back-off
    (``retry.Backoff``), which only a stop cuts short. ``wakeable`` components also end a
    normal sleep on ``wake()``. Any other exception leaves ``run()``: the supervisor stops
    the daemon loudly."""

    component = "component"
    wakeable = False

    def __init__(self, log: logging.Logger, inst: Instruments, interval: float) -> None:
        super().__init__()
        self._log = log
        self._inst = inst
        self.interval = interval

    async def tick(self) -> float:
        """One round of the component's work; returns the seconds to sleep before the next.
        Every subclass defines it (the supervisor runs only subclasses)."""
        raise NotImplementedError(f"{type(self).__name__} defines no tick()")

    def started(self) -> None:
        """Write the start line (what the component runs with)."""

    async def finish(self) -> None:
        """Last work after the stop, before the stop line."""

    def stopped(self) -> None:
        """Write the stop line."""

    def recovered(self) -> None:
        """Called on the first good tick after ticks that found a dependency down."""

    async def run(self) -> None:
        self.started()
        backoff = Backoff()
        failing = False
        while not self.stopping:
            try:
                wait = await self.tick()
            except DEPENDENCY_DOWN as exc:
                failing = True
                wait = backoff.next()
                self.down(exc, wait)
                await self.sleep(wait)
                continue
            backoff.reset()
            if failing:
                failing = False
                self.recovered()
            await self.sleep(wait, wakeable=self.wakeable)
        await self.finish()
        self.stopped()

    def down(self, exc: Exception, retry_in_s: float) -> None:
        """Log and count a tick that found a dependency down."""
        unavailable(self._log, self._inst, self.component, exc, retry_in_s)
