"""Retention: what outlived its period goes, in batches; nothing that is not terminal."""

from __future__ import annotations

from collections.abc import Callable

from maildaemon.config import Settings
from maildaemon.pipeline.retention import RetentionWorker
from maildaemon.store.pipeline.db import Store
from maildaemon.telemetry import Telemetry
from tests.support import Db, command, ingest_one

MakeSettings = Callable[..., Settings]


async def test_retention_deletes_only_what_is_old_and_terminal(make_settings: MakeSettings) -> None:
    settings = make_settings(
        delivery_retention="1d", malformed_retention="1d", retention_batch_size=2
    )
    store = await Store.open(settings.dsn)
    db = Db(settings.dsn)
    try:
        for i in range(5):
            await ingest_one(store, command(f"old-sent-{i}"))
        await ingest_one(store, command("old-queued"))
        await ingest_one(store, command("new-sent"))
        conn_sql = [
            # five old terminal deliveries with an attempt each
            "UPDATE mail.deliveries SET status = 'sent', next_attempt_at = NULL, "
            "finished_at = now() - interval '3 days' WHERE delivery_id LIKE 'old-sent-%'",
            "INSERT INTO mail.attempts (delivery_id, attempt_no, status, started_at, "
            "finished_at) SELECT delivery_id, 1, 'sent', now(), now() FROM mail.deliveries "
            "WHERE delivery_id LIKE 'old-sent-%'",
            # an old delivery that is still queued: never deleted
            "UPDATE mail.deliveries SET created_at = now() - interval '9 days', "
            "finished_at = now() - interval '9 days' WHERE delivery_id = 'old-queued'",
            "UPDATE mail.deliveries SET status = 'sent', next_attempt_at = NULL, "
            "finished_at = now() WHERE delivery_id = 'new-sent'",
            "UPDATE mail.idempotency_reservations SET expires_at = now() - interval '1 second' "
            "WHERE delivery_id LIKE 'old-sent-%'",
            "INSERT INTO mail.malformed_commands (stream_entry_id, failure_code, "
            "failure_detail, raw, received_at) VALUES "
            "('1-1', 'invalid_json', 'x', 'x', now() - interval '2 days'), "
            "('1-2', 'invalid_json', 'x', 'x', now())",
        ]
        for sql in conn_sql:
            await store.pool.execute(sql)
        deleted = await RetentionWorker(settings, store, Telemetry().instruments).run_once()
    finally:
        await store.close()
    assert deleted["deliveries"] == 5 and deleted["idempotency_reservations"] == 5
    assert deleted["malformed_commands"] == 1
    left = {r["delivery_id"] for r in await db.fetch("SELECT delivery_id FROM mail.deliveries")}
    assert left == {"old-queued", "new-sent"}
    assert await db.fetchval("SELECT count(*) FROM mail.attempts") == 0
    assert await db.fetchval("SELECT count(*) FROM mail.delivery_payloads") == 2
