"""Wake the command consumer the moment a command is added, without reading it.

The consumer reads through a bounded Lua script (``stream_reader``), and a script cannot
block; a blocking ``XREADGROUP`` would hand the daemon an entry of any size, which the
bounded read exists to prevent. So the wake-up comes from Redis keyspace notifications:
``__keyevent@<db>__:xadd`` carries the stream's name, never the entry. While it is
subscribed (``active``) the consumer sleeps on an idle stream until woken, or
``MAIL_CONSUMER_BLOCK`` at most; without it (notifications refused, the subscription
down) the consumer polls every few milliseconds as before.

``MAIL_REDIS_STREAM_WAKEUP=auto`` turns the notifications on (``CONFIG SET
notify-keyspace-events``, adding ``E`` and ``t`` to what is set) when they are off;
``existing`` uses them only when the server already has them; ``off`` never subscribes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from maildaemon.config import Settings
from maildaemon.logs import event
from maildaemon.pipeline.lifecycle import Lifecycle, unavailable
from maildaemon.retry import Backoff
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.consumer")
_KEY = "notify-keyspace-events"
_LISTEN_FOR = 1.0  # seconds one wait for a message lasts (then the stop is checked)


def notifications_cover_streams(flags: str) -> bool:
    """Whether ``notify-keyspace-events`` = ``flags`` publishes keyevent XADDs."""
    return "E" in flags and ("t" in flags or "A" in flags)


def with_stream_keyevents(flags: str) -> str:
    return flags + "".join(f for f in "Et" if f not in flags and not (f == "t" and "A" in flags))


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
        self._channel = f"__keyevent@{settings.redis_db}__:xadd"
        self._stream = settings.command_stream.encode()
        self.active = False  # subscribed: an XADD to the stream wakes the consumer

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
        """Whether keyevent XADDs are published, after turning them on in ``auto`` mode."""
        current = await self._redis.config_get("notify-keyspace-events")
        flags = next((_text(v) for k, v in current.items() if _text(k) == _KEY), "")
        if notifications_cover_streams(flags):
            return True
        if mode != "auto":
            event(
                log,
                "stream wake-up unavailable, polling",
                logging.WARNING,
                error=f"notify-keyspace-events is {flags!r}: no keyevent XADD notifications",
                setting="MAIL_REDIS_STREAM_WAKEUP",
            )
            return False
        wanted = with_stream_keyevents(flags)
        await self._redis.config_set("notify-keyspace-events", wanted)
        event(log, "redis keyspace notifications turned on", previous=flags, now=wanted)
        return True

    async def _listen(self, backoff: Backoff) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel)
            self.active = True
            backoff.reset()
            self._on_added()  # entries may have come while we were not listening
            while not self.stopping:
                message = await pubsub.get_message(timeout=_LISTEN_FOR)
                if message is not None and message.get("data") == self._stream:
                    self._on_added()
        finally:
            self.active = False
            await pubsub.aclose()  # type: ignore[no-untyped-call]


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else ""
