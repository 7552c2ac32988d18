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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from maildaemon.config import Settings
from maildaemon.logs import event
from maildaemon.pipeline.lifecycle import Lifecycle, first_of, unavailable
from maildaemon.retry import Backoff
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.consumer")
_KEY = "notify-keyspace-events"
_LISTEN_FOR = 0.05  # seconds one wait for a message lasts (then stop and want are checked)
_XADD = b"xadd"


def notifications_cover_streams(flags: str) -> bool:
    """Whether ``notify-keyspace-events`` = ``flags`` publishes keyspace XADD events."""
    return "K" in flags and ("t" in flags or "A" in flags)


def with_stream_keyevents(flags: str) -> str:
    return flags + "".join(f for f in "Kt" if f not in flags and not (f == "t" and "A" in flags))


class StreamWakeup(Lifecycle):
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
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
                if not await self._notifications_on(mode):
                    return
                await self._listen(backoff)
            except ResponseError as exc:  # CONFIG refused or renamed: poll instead
                event(
                    log,
                    "stream wake-up unavailable, polling",
                    logging.WARNING,
                    error=str(exc),
                    setting="MAIL_REDIS_STREAM_WAKEUP",
                )
                return
            except RedisError as exc:
                wait = backoff.next()
                unavailable(log, self._inst, "wakeup", exc, wait)
                await self.sleep(wait)
            finally:
                self.active = False

    async def _notifications_on(self, mode: str) -> bool:
        """Whether keyspace XADD events are published, after turning them on in ``auto`` mode."""
        current = await self._redis.config_get("notify-keyspace-events")
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
        await self._redis.config_set("notify-keyspace-events", wanted)
        event(log, "redis keyspace notifications turned on", previous=flags, now=wanted)
        return True

    async def _listen(self, backoff: Backoff) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        subscribed = False
        try:
            while not self.stopping:
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
            await pubsub.aclose()  # type: ignore[no-untyped-call]


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else ""
