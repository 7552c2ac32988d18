"""Webhooks through kill -9: the daemon process killed twice while it delivers webhooks to
a real receiver; after the restarts every outcome event has reached the receiver, and an
event that arrived twice (its attempt was in flight at a kill) came with the same
``webhook-id`` and the same body — duplicates only of that kind."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from pathlib import Path

import pytest

from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.operator import webhooks as ops
from maildaemon.store.operator.records import Actor
from maildaemon.store.pipeline.db import Store
from maildaemon.store.webhooks.admin import WebhookAdmin
from tests.reliability.ledger import Daemon, settle
from tests.reliability.test_process_faults import enqueue, env_for, producer
from tests.support import Db, wait_for
from tests.webhook_receiver import Receiver

WEBHOOK_ENV = {
    "MAIL_WEBHOOK_ALLOW_HTTP": "true",
    "MAIL_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
    "MAIL_WEBHOOK_TIMEOUT": "1s",  # lease: 12 s
    "MAIL_WEBHOOK_POLL_INTERVAL": "0.1s",
    "MAIL_WEBHOOK_RETRY_LADDER": ",".join(["0.2s"] * 20),
    "MAIL_EVENT_PUBLISH_INTERVAL": "0.1s",
}


@pytest.mark.timeout(300)
async def test_kill_9_mid_webhooks_loses_none(
    pg_dsn: str, redis_addr: str, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    n, rng = 300, random.Random()
    receiver = Receiver(default=("slow", 0.02))  # a little time in flight per event
    await receiver.start()
    db = Db(pg_dsn)
    daemons: list[Daemon] = []

    def daemon(k: int) -> Daemon:
        env = env_for(pg_dsn, redis_addr, smtp_sink, f"wh9-{k}", **WEBHOOK_ENV)
        d = Daemon(env, tmp_path / f"{k}.log")
        daemons.append(d)
        return d

    try:
        first = daemon(0)
        await first.start()  # migrations applied
        store = await Store.open(pg_dsn, min_size=1, max_size=2)
        try:
            rules = ops.TargetRules(True, ("127.0.0.0/8",), 60.0)
            added = await ops.add(
                WebhookAdmin(store.pool), rules, receiver.url, None, None, Actor("t"), None
            )
        finally:
            await store.close()
        receiver.secrets.append(added.secret)
        await enqueue(producer(pg_dsn, redis_addr), "wh9", n)
        for k in (1, 2):
            await wait_for(lambda k=k: asyncio.sleep(0, len(receiver.requests) > 40 * k), 60)
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            await daemons[-1].kill9()
            await daemon(k).start()
        await settle(db, n, timeout=120)

        async def all_delivered() -> bool:
            waiting = await db.fetchval("SELECT count(*) FROM mail.webhook_queue")
            events = await db.fetchval("SELECT count(*) FROM mail.webhook_events")
            return bool(waiting == 0 and events == n)

        await wait_for(all_delivered, 90, interval=0.2)
        assert await daemons[-1].sigterm() == 0
    finally:
        for d in daemons:
            if d.proc is not None and d.proc.returncode is None:
                await d.kill9()
        await receiver.stop()
    ids = {f"msg_{i}" for i in await _event_ids(db)}
    bodies: dict[str, set[bytes]] = defaultdict(set)
    for r in receiver.requests:
        assert r.verified_with == [added.secret]
        bodies[r.webhook_id].add(r.raw)
    accepted = {r.webhook_id for r in receiver.accepted()}
    assert accepted == ids, f"missing: {sorted(ids - accepted)[:5]}"
    assert all(len(b) == 1 for b in bodies.values()), "a repeat is the same event, same id"
    delivered = {r.body["data"]["delivery_id"] for r in receiver.accepted()}
    assert delivered == {f"wh9-{i}" for i in range(n)}
    repeats = len(receiver.accepted()) - len(accepted)
    print(f"\nwebhooks through kill -9 x2: {n} events, all delivered, {repeats} repeats (same id)")


async def _event_ids(db: Db) -> list[int]:
    return [r["id"] for r in await db.fetch("SELECT id FROM mail.webhook_events")]
