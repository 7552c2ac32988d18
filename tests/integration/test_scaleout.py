"""Scale-out: three replicas on one Redis consumer group and one database.

Each replica is a whole daemon (its own pools, consumer, scheduler, SMTP connections); they
share the stream's consumer group, the database and the SMTP server. The run includes
retries (a transient refusal at first), so deliveries are attempted more than once and
possibly by different replicas: no delivery may ever have two attempts open at once, and
the SMTP server must receive each message exactly once.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
from collections.abc import Callable
from datetime import datetime

from maildaemon.config import Settings
from maildaemon.devstack.postgres import pick_free_port
from maildaemon.devstack.smtp_sink import SmtpSink
from tests.support import Db, command, running_app, wait_for, xadd

MESSAGES = 240
RETRIED = 30  # deliveries whose first attempt is refused with 451


async def test_three_replicas_never_attempt_a_delivery_twice_at_once(
    make_settings: Callable[..., Settings], smtp_sink: SmtpSink
) -> None:
    replicas = [
        make_settings(
            consumer_name=f"replica-{n}",
            internal_http_addr=f"127.0.0.1:{pick_free_port()}",
            attempt_worker_concurrency=4,
            consumer_batch_size=50,
        )
        for n in range(3)
    ]
    for i in range(RETRIED):
        smtp_sink.behaviour.rcpt_replies[f"retry-{i}@example.com"] = ["451 4.3.0 try later"]
    docs = [
        command(f"s-{i}", to=[{"address": f"retry-{i}@example.com"}])
        if i < RETRIED
        else command(f"s-{i}", to=[{"address": f"user-{i}@example.com"}])
        for i in range(MESSAGES)
    ]
    db = Db(replicas[0].dsn)
    async with contextlib.AsyncExitStack() as stack:
        for settings in replicas:
            await stack.enter_async_context(running_app(settings))
        for start in range(0, MESSAGES, 40):
            await xadd(replicas[0], *docs[start : start + 40])

        async def all_sent() -> bool:
            sent = await db.fetchval("SELECT count(*) FROM mail.deliveries WHERE status = 'sent'")
            return bool(sent == MESSAGES)

        await wait_for(all_sent, timeout=120, interval=0.2)

    attempts = await db.fetch(
        "SELECT delivery_id, attempt_no, status, started_at, finished_at, worker "
        "FROM mail.attempts ORDER BY delivery_id, started_at"
    )
    by_delivery: dict[str, list[tuple[datetime, datetime]]] = {}
    for row in attempts:
        by_delivery.setdefault(row["delivery_id"], []).append(
            (row["started_at"], row["finished_at"])
        )
    overlapping = [
        d
        for d, spans in by_delivery.items()
        for (_s1, f1), (s2, _f2) in itertools.pairwise(spans)  # sorted by start
        if s2 < f1
    ]
    assert not overlapping, f"attempts overlapping in time: {overlapping[:5]}"
    retried = [d for d, spans in by_delivery.items() if len(spans) > 1]
    assert len(retried) == RETRIED  # the retries really happened (else the check is idle)
    # The SMTP server saw every message once: one accepted transaction per Message-ID.
    message_ids = Counter(m.parse()["Message-ID"] for m in smtp_sink.messages)
    assert len(message_ids) == MESSAGES
    assert max(message_ids.values()) == 1
    # Every replica did part of the work (claims spread over the group).
    workers = Counter(row["worker"] for row in attempts)
    assert set(workers) == {"replica-0", "replica-1", "replica-2"}, workers
    # Every stream entry was taken in exactly once across the group.
    created = await db.fetchval("SELECT count(*) FROM mail.deliveries")
    assert created == MESSAGES
