"""The crash-duplicate bound, proved where it is decided: while no result can be committed
at all, each SMTP connection sends at most MAIL_RESULT_WINDOW messages and then waits.

(A crash at that moment leaves exactly those messages accepted and unrecorded: they are
what the next claim sends again, flagged. The kill -9 tests in test_process_faults.py
check the same bound from outside.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest

from maildaemon.config import Settings
from maildaemon.devstack.smtp_sink import SmtpSink
from tests.support import Db, command, running_app, wait_for, xadd

MakeSettings = Callable[..., Settings]
CONNECTIONS = 2


@pytest.mark.parametrize("window", [1, 3])
async def test_connections_stop_at_the_window_while_results_cannot_commit(
    make_settings: MakeSettings, smtp_sink: SmtpSink, window: int
) -> None:
    settings = make_settings(attempt_worker_concurrency=CONNECTIONS, result_window=window)
    db = Db(settings.dsn)
    await db.fetch(
        "INSERT INTO mail.sending_pauses (scope, paused_by, reason)"
        " VALUES ('*', 'test', 'hold') RETURNING scope"
    )
    ids = [f"win-{i}" for i in range(20)]
    bound = CONNECTIONS * window
    async with running_app(settings):
        await xadd(settings, *[command(i) for i in ids])

        async def all_queued() -> bool:
            n = await db.fetchval("SELECT count(*) FROM mail.deliveries WHERE status = 'queued'")
            return n == len(ids)

        await wait_for(all_queued, timeout=20)
        # Every result transaction writes its event to mail.outbox: a SHARE lock on it
        # makes every commit of a result wait, while claims and sends go on.
        blocker = await asyncpg.connect(settings.dsn)
        try:
            holding = blocker.transaction()
            await holding.start()
            await blocker.execute("LOCK TABLE mail.outbox IN SHARE MODE")
            await db.fetch("DELETE FROM mail.sending_pauses RETURNING scope")

            async def window_full() -> bool:
                return len(smtp_sink.messages) >= bound

            await wait_for(window_full, timeout=20)
            # "Nothing more is sent" has no event to wait on: give the workers ample time
            # (many sends' worth on loopback) to break the bound if they would.
            await asyncio.sleep(1.0)
            assert len(smtp_sink.messages) == bound
            await holding.rollback()
        finally:
            await blocker.close()
        for delivery_id in ids:
            await db.wait_status(delivery_id, "sent", timeout=30)
    assert len(smtp_sink.messages) == len(ids)
