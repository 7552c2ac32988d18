"""The LISTEN connection comes back after it drops (issue 10, item 14).

The scheduler polls only every 30 s here, so a delivery taken in by another replica (a
NOTIFY on ``mail_due``) is sent promptly only if the LISTEN connection works. The test
terminates the LISTEN backend with ``pg_terminate_backend`` and checks that a NOTIFY wakes
the scheduler again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from maildaemon.config import Settings
from maildaemon.store.pipeline.db import Store
from tests.support import Db, command, ingest_one, running_app, wait_for

MakeSettings = Callable[..., Settings]
_LISTENER = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
    "AND query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()"
)


async def _sent_within(store: Store, db: Db, delivery_id: str) -> float:
    started = time.monotonic()
    await ingest_one(store, command(delivery_id))  # another replica's intake: NOTIFY only
    await db.wait_status(delivery_id, "sent", timeout=10)
    return time.monotonic() - started


@pytest.mark.timeout(120)
async def test_a_terminated_listen_connection_is_reopened(make_settings: MakeSettings) -> None:
    settings = make_settings(scheduler_poll_interval="30s")
    db = Db(settings.dsn)
    store = await Store.open(settings.dsn, min_size=1, max_size=2)
    try:
        async with running_app(settings):
            [before] = await wait_for(lambda: db.fetch(_LISTENER), timeout=10)
            first = await _sent_within(store, db, "l-before")
            await db.fetchval("SELECT pg_terminate_backend($1)", before["pid"])

            async def new_listener() -> bool:
                rows = await db.fetch(_LISTENER)
                return bool(rows) and rows[0]["pid"] != before["pid"]

            await wait_for(new_listener, timeout=10)
            again = await _sent_within(store, db, "l-after")
    finally:
        await store.close()
    print(f"\nNOTIFY to send: {first:.2f} s before, {again:.2f} s after the LISTEN reconnect")
    assert first < 5 and again < 5  # not the 30 s poll
