"""An idle consumer is woken by the XADD itself (keyspace notifications), not by a poll."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest

from maildaemon.config import Settings
from maildaemon.pipeline.stream_wakeup import notifications_cover_streams, with_stream_keyevents
from tests.support import Db, command, redis_client, running_app, wait_for, xadd

MakeSettings = Callable[..., Settings]


def test_flags_gain_only_what_stream_keyevents_need() -> None:
    assert with_stream_keyevents("") == "Kt"
    assert with_stream_keyevents("Ex") == "ExKt"
    assert with_stream_keyevents("AK") == "AK"  # A already holds t
    assert with_stream_keyevents("Kt") == "Kt"
    assert notifications_cover_streams("KEA") and notifications_cover_streams("Kt")
    assert not notifications_cover_streams("Et") and not notifications_cover_streams("Kg")


async def _reset_notifications(settings: Settings, flags: str) -> None:
    client = redis_client(settings.redis_master_addr)
    try:
        await client.config_set("notify-keyspace-events", flags)
    finally:
        await client.aclose()


async def _subscribers(settings: Settings) -> int:
    client = redis_client(settings.redis_master_addr)
    try:
        [(_, count)] = await client.pubsub_numsub(f"__keyspace@0__:{settings.command_stream}")
        return int(count)
    finally:
        await client.aclose()


async def _intake_after_idle(settings: Settings, db: Db, name: str) -> float:
    """Seconds from XADD to the delivery row, the consumer idle before."""
    # No event says "the consumer is asleep now"; its poll backs off to 50 ms within
    # ~0.1 s of an empty read, so 0.3 s puts it in its longest sleep.
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await xadd(settings, command(name))

    async def stored() -> bool:
        return bool(
            await db.fetchval("SELECT count(*) FROM mail.deliveries WHERE delivery_id = $1", name)
        )

    await wait_for(stored, timeout=20, interval=0.005)
    return time.monotonic() - started


async def test_notifications_wake_the_consumer_at_once(
    make_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    # A consumer that only polled would sleep MAIL_CONSUMER_BLOCK (5 s) while subscribed.
    settings = make_settings(smtp_mode="stub", consumer_block="5s", redis_stream_wakeup="auto")
    await _reset_notifications(settings, "")
    db = Db(settings.dsn)
    caplog.set_level(logging.INFO, logger="maildaemon.consumer")
    async with running_app(settings):

        async def subscribed() -> bool:
            return await _subscribers(settings) >= 1

        await wait_for(subscribed, timeout=10)
        waits = [await _intake_after_idle(settings, db, f"wake-{i}") for i in range(5)]
    assert max(waits) < 1.0, waits
    assert any(r.getMessage() == "redis keyspace notifications turned on" for r in caplog.records)


async def test_without_notifications_the_consumer_polls(
    make_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(smtp_mode="stub", consumer_block="5s", redis_stream_wakeup="existing")
    await _reset_notifications(settings, "")
    db = Db(settings.dsn)
    caplog.set_level(logging.INFO, logger="maildaemon.consumer")
    async with running_app(settings):

        async def refused() -> bool:
            return any(
                r.getMessage() == "stream wake-up unavailable, polling" for r in caplog.records
            )

        await wait_for(refused, timeout=10)
        assert await _subscribers(settings) == 0
        # Polling backs off to 50 ms at most, never to MAIL_CONSUMER_BLOCK.
        assert await _intake_after_idle(settings, db, "polled") < 1.0
