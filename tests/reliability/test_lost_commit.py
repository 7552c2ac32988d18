"""A claim whose commit reply is lost with the connection is given back at reconnect.

The claim statement commits in PostgreSQL, but the daemon only sees its connection drop:
it cannot tell whether the lease was taken. Before, those deliveries sat ``sending`` until
the lease ran out (a minute here, 120 s by default); now the scheduler releases what that
statement leased as soon as PostgreSQL answers again, and they go out at once.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from maildaemon.config import Settings
from maildaemon.devstack.smtp_sink import SmtpSink
from tests.support import Db, TcpProxy, command, running_app, wait_for, xadd

MakeSettings = Callable[..., Settings]

LEASE = 47.3125  # seconds: long, and a float8 no other statement binds (the fault's marker)


async def test_claim_with_lost_commit_reply_is_released_at_reconnect(
    make_settings: MakeSettings, pg_dsn: str, smtp_sink: SmtpSink
) -> None:
    parts = urlsplit(pg_dsn)
    assert parts.hostname is not None and parts.port is not None
    proxy = TcpProxy(parts.hostname, parts.port)
    await proxy.start()
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{proxy.port}"
    via_proxy = urlunsplit(parts._replace(netloc=netloc))
    db = Db(pg_dsn)  # the test's own view, not through the proxy
    await db.fetch(
        "INSERT INTO mail.sending_pauses (scope, paused_by, reason)"
        " VALUES ('*', 'test', 'hold') RETURNING scope"
    )
    settings = make_settings(postgres_primary_dsn=via_proxy, lease_duration=LEASE)
    ids = [f"lost-{i}" for i in range(5)]
    try:
        async with running_app(settings):
            await xadd(settings, *[command(i) for i in ids])

            async def all_queued() -> bool:
                n = await db.fetchval(
                    "SELECT count(*) FROM mail.deliveries WHERE status = 'queued'"
                )
                return n == len(ids)

            await wait_for(all_queued, timeout=20)
            # The next claim statement (the only one binding LEASE) commits; its reply is lost.
            proxy.lose_reply_to(struct.pack("!d", LEASE))
            cut_at = time.monotonic()
            await db.fetch("DELETE FROM mail.sending_pauses RETURNING scope")

            async def reply_lost() -> bool:
                return proxy.replies_lost == 1

            await wait_for(reply_lost, timeout=20)
            # The claim did commit: the deliveries were leased under the statement's ref.
            for delivery_id in ids:
                await db.wait_status(delivery_id, "sent", timeout=30)
            waited = time.monotonic() - cut_at
    finally:
        await proxy.cut()
    assert waited < LEASE / 2, f"released at reconnect, not at lease expiry ({waited:.1f} s)"
    rows = await db.fetch(
        "SELECT delivery_id, attempt_count, possible_duplicate FROM mail.deliveries"
        " ORDER BY delivery_id"
    )
    # The lost claim's attempt was withdrawn: one attempt each, not flagged as a duplicate.
    assert [(r["attempt_count"], r["possible_duplicate"]) for r in rows] == [(1, False)] * 5
    attempts = await db.fetch("SELECT delivery_id, attempt_no, status FROM mail.attempts")
    assert sorted((a["delivery_id"], a["attempt_no"], a["status"]) for a in attempts) == [
        (i, 1, "sent") for i in sorted(ids)
    ]
    assert len(smtp_sink.messages) == len(ids)
