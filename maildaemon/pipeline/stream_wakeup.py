"""Wake the command consumer the moment a command is added, without reading it.

The consumer reads through a bounded Lua script (``stream_reader``), and a script cannot
block; a blocking ``XREADGROUP`` would hand the daemon an entry of any size, which the
bounded read exists to prevent. So the wake-up comes from Redis keyspace notifications:
``__keyspace@<db>__:<stream>`` says ``xadd`` for the command stream alone (never the entry,
never another key's events). The consumer asks for it only while it is idle (``want``):
a busy consumer reads batch after batch and would pay for one message per XADD for
nothing. While subscribed (``active``) the idle consumer sleeps until woken, or
``MAIL_CONSUMER_BLOCK`` at most; otherwise (busy, notifications refused, the subscription
down or not yet up) it polls every few milliseconds as before.

``MAIL_REDIS_STREAM_WAKEUP=auto`` turns the notifications on (``CONFIG SET
notify-keyspace-events``, adding ``K`` and ``t`` to what is set) when they are off;
``existing`` uses them only when the server already has them; ``off`` never subscribes.

In a Redis Cluster a keyspace notification is published only on the node that holds the
key: the wake-up turns them on and subscribes on the master of the command stream's slot,
and after a failover or a slot migration (checked every ``_OWNER_CHECK`` seconds, and
whenever its connection breaks) subscribes on the new one. Until then the consumer polls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ResponseError

from maildaemon.config import Settings
from maildaemon.logs import event
from maildaemon.pipeline.lifecycle import (
    REDIS_DOWN,
    Lifecycle,
    RedisClient,
    first_of,
    redis_moving,
    unavailable,
)
from maildaemon.retry import Backoff
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.consumer")
_KEY = "notify-keyspace-events"
_LISTEN_FOR = 0.05  # seconds one wait for a message lasts (then stop and want are checked)
_XADD = b"xadd"
_OWNER_CHECK = 1.0  # seconds between checks that the subscribed node still has the stream


def notifications_cover_streams(flags: str) -> bool:
    """Whether ``notify-keyspace-events`` = ``flags`` publishes keyspace XADD events."""
    return "K" in flags and ("t" in flags or "A" in flags)


def with_stream_keyevents(flags: str) -> str:
    return flags + "".join(f for f in "Kt" if f not in flags and not (f == "t" and "A" in flags))


class StreamWakeup(Lifecycle):
    def __init__(
        self,
        settings: Settings,
        redis: RedisClient,
        instruments: Instruments,
        on_added: Callable[[], None],
    ) -> None:
        super().__init__()
        self._s = settings
        self._redis = redis
        self._inst = instruments
        self._on_added = on_added
        self._channel = f"__keyspace@{settings.redis_db}__:{settings.command_stream}"
        self.active = False  # subscribed: an XADD to the stream wakes the consumer
        self._want = False
        self._changed = asyncio.Event()

    def want(self, idle: bool) -> None:
        """The consumer is idle (wants to be woken) or busy (reads on regardless)."""
        if idle != self._want:
            self._want = idle
            self._changed.set()

    async def run(self) -> None:
        mode = self._s.redis_stream_wakeup
        if mode == "off":
            return
        backoff = Backoff()
        while not self.stopping:
            try:
                node = self._stream_node()
                if not await self._notifications_on(mode, node):
                    return
                await self._listen(backoff, node)
            except ResponseError as exc:  # CONFIG refused or renamed: poll instead
                if redis_moving(exc):  # a failover under way: subscribe again after it
                    await self._retry(exc, backoff)
                    continue
                event(
                    log,
                    "stream wake-up unavailable, polling",
                    logging.WARNING,
                    error=str(exc),
                    setting="MAIL_REDIS_STREAM_WAKEUP",
                )
                return
            except REDIS_DOWN as exc:
                await self._retry(exc, backoff)
            finally:
                self.active = False

    async def _retry(self, exc: Exception, backoff: Backoff) -> None:
        wait = backoff.next()
        unavailable(log, self._inst, "wakeup", exc, wait)
        await self.sleep(wait)

    def _stream_node(self) -> ClusterNode | None:
        """In a Cluster, the master of the command stream's slot; else None."""
        if isinstance(self._redis, aioredis.RedisCluster):
            return self._redis.get_node_from_key(self._s.command_stream)
        return None

    def _moved(self, node: ClusterNode | None) -> bool:
        if node is None:
            return False
        now = self._stream_node()
        if now is not None and now.name == node.name:
            return False
        event(
            log,
            "stream wake-up follows the stream's master",
            previous=node.name,
            now=now.name if now else None,
        )
        return True

    async def _notifications_on(self, mode: str, node: ClusterNode | None = None) -> bool:
        """Whether keyspace XADD events are published, after turning them on in ``auto`` mode."""
        on: dict[str, Any] = {"target_nodes": node} if node is not None else {}
        current = await self._redis.config_get("notify-keyspace-events", **on)
        flags = next((_text(v) for k, v in current.items() if _text(k) == _KEY), "")
        if notifications_cover_streams(flags):
            return True
        if mode != "auto":
            event(
                log,
                "stream wake-up unavailable, polling",
                logging.WARNING,
                error=f"notify-keyspace-events is {flags!r}: no keyspace XADD notifications",
                setting="MAIL_REDIS_STREAM_WAKEUP",
            )
            return False
        wanted = with_stream_keyevents(flags)
        await self._redis.config_set("notify-keyspace-events", wanted, **on)
        event(log, "redis keyspace notifications turned on", previous=flags, now=wanted)
        return True

    async def _listen(self, backoff: Backoff, node: ClusterNode | None = None) -> None:
        """Subscribe while wanted; returns (to be called again) when, in a Cluster, the
        stream's slot has moved to another master than ``node``."""
        pubsub: PubSub = (
            self._redis.pubsub(node=node, ignore_subscribe_messages=True)
            if isinstance(self._redis, aioredis.RedisCluster)
            else self._redis.pubsub(ignore_subscribe_messages=True)
        )
        subscribed = False
        checked = time.monotonic()
        try:
            while not self.stopping:
                if node is not None and time.monotonic() - checked >= _OWNER_CHECK:
                    checked = time.monotonic()
                    if self._moved(node):
                        return
                if self._want and not subscribed:
                    await pubsub.subscribe(self._channel)
                    subscribed = self.active = True
                    backoff.reset()
                    self._on_added()  # entries may have come while we were not listening
                elif subscribed and not self._want:
                    self.active = False  # the consumer polls from here on
                    await pubsub.unsubscribe(self._channel)
                    subscribed = False
                if subscribed:
                    message = await pubsub.get_message(timeout=_LISTEN_FOR)
                    if message is not None and message.get("data") == _XADD:
                        self._on_added()
                else:
                    self._changed.clear()
                    await first_of(self._changed, self._stopping)
        finally:
            self.active = False
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else ""
