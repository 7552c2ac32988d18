"""Webhooks through a 30 s receiver outage, with two daemon replicas sharing the queue:
every event accepted exactly once afterwards, never more than MAIL_WEBHOOK_CONCURRENCY in
flight to the endpoint across both replicas, and the outage cost a few probes per retry
step, not one attempt per waiting event."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable

import pytest

from maildaemon.config import Settings
from maildaemon.operator import webhooks as ops
from maildaemon.store.operator.records import Actor
from maildaemon.store.pipeline.db import Store
from maildaemon.store.webhooks.admin import WebhookAdmin
from tests.support import Db, command, ingest_one, running_app, wait_for
from tests.webhook_receiver import Receiver

MakeSettings = Callable[..., Settings]
OUTAGE_S = 30.0


@pytest.mark.timeout(240)
async def test_receiver_down_30s_with_two_replicas(make_settings: MakeSettings) -> None:
    receiver = Receiver(default=("slow", 0.02))
    await receiver.start()
    common = {
        "smtp_mode": "stub",
        "webhook_allow_http": True,
        "webhook_allowed_networks": "127.0.0.0/8",
        "webhook_poll_interval": "0.1s",
        "webhook_retry_ladder": ",".join(["1s"] * 100),
        "webhook_retry_jitter": 0,
        "webhook_timeout": "2s",
        "event_publish_interval": "0.1s",
    }
    one = make_settings(consumer_name="wh-a", **common)
    two = make_settings(consumer_name="wh-b", **common)
    db = Db(one.dsn)
    store = await Store.open(one.dsn)
    n = 200
    try:
        async with running_app(one), running_app(two):
            rules = ops.TargetRules(True, ("127.0.0.0/8",), 60.0)
            added = await ops.add(
                WebhookAdmin(store.pool), rules, receiver.url, None, None, Actor("t"), None
            )
            receiver.secrets.append(added.secret)
            for i in range(n):
                await ingest_one(store, command(f"wh-out-{i}"))
            await wait_for(lambda: asyncio.sleep(0, len(receiver.accepted()) >= 40), 60)
            await receiver.stop()
            down_at = time.monotonic()
            failed_before = await db.fetchval(
                "SELECT count(*) FROM mail.webhook_attempts WHERE NOT ok"
            )
            await asyncio.sleep(OUTAGE_S)  # the outage itself is what is under test
            failed_during = (
                await db.fetchval("SELECT count(*) FROM mail.webhook_attempts WHERE NOT ok")
                - failed_before
            )
            await receiver.start()
            up_at = time.monotonic()

            async def drained() -> bool:
                return bool(await db.fetchval("SELECT count(*) = 0 FROM mail.webhook_queue"))

            await wait_for(drained, 90, interval=0.2)
            back_in = time.monotonic() - up_at
    finally:
        await store.close()
        with contextlib.suppress(Exception):
            await receiver.stop()
    accepted = Counter(r.webhook_id for r in receiver.accepted())
    delivered = {r.body["data"]["delivery_id"] for r in receiver.accepted()}
    assert delivered == {f"wh-out-{i}" for i in range(n)}
    assert set(accepted.values()) == {1}, "each event accepted exactly once"
    assert receiver.max_in_flight <= 4, receiver.max_in_flight
    # Two replicas each hold the endpoint after a failure: a round of at most 4 probes per
    # replica per 1 s step, not 160 waiting events tried again and again.
    assert failed_during <= 2 * 4 * (OUTAGE_S + 2), failed_during
    print(
        f"\nwebhooks, receiver down {time.monotonic() - down_at - back_in:.0f} s, 2 replicas:"
        f" {n} events, all accepted once, {failed_during} failed attempts during the outage,"
        f" drained {back_in:.1f} s after its return, max {receiver.max_in_flight} in flight"
    )
