"""A dead destination is not every delivery's failure (issue 10, item 10).

The SMTP server sits behind a relay the test cuts (connection refused) and restores. While
it is down the daemon stops claiming, reports the destination down on /readyz and in its
gauge, charges no more than one attempt per connection, and resumes within about a second
of the server's return.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
import pytest

from maildaemon.config import Settings
from maildaemon.devstack.smtp_sink import SmtpSink
from tests.support import Db, TcpProxy, command, running_app, wait_for, xadd

MakeSettings = Callable[..., Settings]
CONCURRENCY = 4


async def _readyz(settings: Settings) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{settings.internal_http_addr}/readyz") as resp,
    ):
        return resp.status, await resp.json()


@pytest.mark.timeout(180)
async def test_outage_pauses_claiming_and_resumes_promptly(
    make_settings: MakeSettings, smtp_sink: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = TcpProxy(smtp_sink.host, smtp_sink.port)
    await proxy.start()
    settings = make_settings(
        smtp_addr=f"127.0.0.1:{proxy.port}",
        attempt_worker_concurrency=CONCURRENCY,
        retry_ladder="1s,1s,1s",
    )
    db = Db(settings.dsn)
    caplog.set_level(logging.INFO)
    count = 300
    async with running_app(settings) as app:
        await xadd(settings, command("before"))
        await db.wait_status("before", "sent")
        await proxy.cut()
        await xadd(settings, *[command(f"out-{i}") for i in range(count)])
        await wait_for(lambda: _down(settings), timeout=15)
        assert app.telemetry.instruments.destination_up == 0
        await asyncio.sleep(4.0)  # an outage of a few seconds
        charged = await db.fetchval(
            "SELECT count(*) FROM mail.attempts WHERE status NOT IN ('sent', 'started')"
        )
        leased = await db.fetchval("SELECT count(*) FROM mail.deliveries WHERE status='sending'")
        await proxy.start()
        back = time.monotonic()
        await wait_for(
            lambda: db.fetchval(
                "SELECT count(*) > 0 FROM mail.deliveries "
                "WHERE status = 'sent' AND delivery_id LIKE 'out-%'"
            ),
            timeout=30,
            interval=0.02,
        )
        resumed = time.monotonic() - back
        await wait_for(
            lambda: db.fetchval(
                "SELECT count(*) = $1 FROM mail.deliveries "
                "WHERE status = 'sent' AND delivery_id LIKE 'out-%'",
                count,
            ),
            timeout=60,
        )
        cleared = time.monotonic() - back
        status, _ = await _readyz(settings)
        assert status == 200 and app.telemetry.instruments.destination_up == 1
    await proxy.cut()
    events = [r.getMessage() for r in caplog.records]
    print(
        f"\noutage: {count} deliveries queued during a 4 s outage; attempts charged: "
        f"{charged} (connections: {CONCURRENCY}); claims held during it: {leased}; "
        f"sending resumed {resumed:.2f} s and the backlog cleared {cleared:.2f} s after "
        "the server came back"
    )
    assert resumed < 2.5
    # Only the attempt that discovered the outage: the other connections, failing to open
    # after it, give their claims back without an attempt.
    assert charged == 1
    assert leased <= 2 * CONCURRENCY
    assert "destination down" in events and "destination up" in events
    assert cleared < 10.0
    # Every delivery was sent once, with no more than the discovering attempts failed.
    per_delivery = await db.fetch(
        "SELECT delivery_id, count(*) AS n FROM mail.attempts "
        "WHERE delivery_id LIKE 'out-%' GROUP BY delivery_id HAVING count(*) > 1"
    )
    assert len(per_delivery) <= CONCURRENCY


async def _down(settings: Settings) -> bool:
    status, body = await _readyz(settings)
    checks = body.get("checks", {})
    assert isinstance(checks, dict)
    return status == 503 and str(checks.get("smtp_destination", "")).startswith("down")
