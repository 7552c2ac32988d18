"""Outcome events: written with the outcome (outbox), published at least once, in order.

A Redis outage while outcomes are recorded delays their events and loses none; an
operator's cancel goes through the same terminal-outcome path and publishes its event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from maildaemon.config import Settings
from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.store.operator.actions import OperatorStore
from maildaemon.store.operator.records import Actor
from maildaemon.store.pipeline.db import Store
from tests.support import Db, TcpProxy, command, ingest_one, redis_client, running_app, wait_for

MakeSettings = Callable[..., Settings]


async def _events(settings: Settings, redis_addr: str) -> list[dict[str, str]]:
    client = redis_client(redis_addr)
    try:
        entries = await client.xrange(settings.event_stream)
    finally:
        await client.aclose()
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


async def test_redis_outage_delays_events_and_loses_none(
    make_settings: MakeSettings, smtp_sink: SmtpSink, redis_addr: str
) -> None:
    smtp_sink.behaviour.rcpt_replies["later@example.com"] = ["451 4.7.1 try later"] * 10
    host, _, port = redis_addr.rpartition(":")
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    settings = make_settings(
        redis_master_addr=f"127.0.0.1:{proxy.port}",
        retry_ladder="0.3s,0.3s",
        retry_jitter=0,
        event_publish_interval="0.2s",
    )
    db = Db(settings.dsn)
    store = await Store.open(settings.dsn)
    try:
        async with running_app(settings):
            await proxy.cut()  # Redis is gone for the daemon from here on
            await ingest_one(store, command("ev-sent"))
            await ingest_one(store, command("ev-dead", to=["later@example.com"]))
            await db.wait_status("ev-sent", "sent")
            await db.wait_status("ev-dead", "dead_letter")
            waiting = await db.fetchval("SELECT count(*) FROM mail.outbox")
            assert waiting == 4, "every outcome's event waits in the outbox"
            assert await _events(settings, redis_addr) == []
            await proxy.start()  # Redis is back

            async def published() -> list[dict[str, str]] | None:
                events = await _events(settings, redis_addr)
                return events if len(events) == 4 else None

            events = await wait_for(published, timeout=20)
            assert await db.fetchval("SELECT count(*) FROM mail.outbox") == 0
    finally:
        await store.close()
        await proxy.cut()
    by_delivery: dict[str, list[str]] = {}
    for e in events:
        by_delivery.setdefault(e["delivery_id"], []).append(e["status"])
    assert by_delivery == {
        "ev-sent": ["sent"],
        "ev-dead": ["retry_scheduled", "retry_scheduled", "dead_letter"],
    }
    attempts = [e["attempt"] for e in events if e["delivery_id"] == "ev-dead"]
    assert attempts == ["1", "2", "3"], "in order per delivery"


async def test_cancel_goes_through_the_outcome_path_and_publishes(
    make_settings: MakeSettings, redis_addr: str
) -> None:
    settings = make_settings(smtp_mode="stub", event_publish_interval="0.2s")
    db = Db(settings.dsn)
    store = await Store.open(settings.dsn)
    try:
        later: dict[str, Any] = command("ev-cancel", send_at="2099-01-01T00:00:00Z")
        await ingest_one(store, later)
        async with running_app(settings):
            change = await OperatorStore(store.pool).cancel(
                "ev-cancel", Actor("ops@example"), "dup"
            )
            assert change.status == "cancelled"

            async def cancelled() -> list[dict[str, str]]:
                events = await _events(settings, redis_addr)
                return [e for e in events if e["delivery_id"] == "ev-cancel"]

            (event,) = await wait_for(cancelled)
    finally:
        await store.close()
    assert event["status"] == "cancelled" and event["attempt"] == "0"
    row = (await db.fetch("SELECT * FROM mail.deliveries WHERE delivery_id = 'ev-cancel'"))[0]
    assert row["status"] == "cancelled" and row["attempt_count"] == 0
    assert row["finished_at"] is not None and row["next_attempt_at"] is None
    assert "cancelled by ops@example: dup" in row["status_reason"]
    assert await db.attempts("ev-cancel") == []
