"""The internal API cannot hurt delivery: its own small pool with a statement timeout, indexed
recipient searches, and reads behind a token when one is configured."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg

from maildaemon.config import Settings
from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.store.operator import statements as q
from maildaemon.store.operator.filters import DeadLetterFilter, DeliveryFilter, PageRequest
from maildaemon.store.operator.reads import OperatorReads, dl_args
from maildaemon.store.pipeline.db import Store
from tests.support import Db, command, running_app, wait_for, xadd

MakeSettings = Callable[..., Settings]
P = "/api/v1/internal"
TOKEN = "operator-token-for-tests"
READ_TOKEN = "read-only-token-for-tests"


async def _get(
    session: aiohttp.ClientSession, url: str, token: str | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(url, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_slow_api_reads_cannot_stall_intake_or_claims(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    # Fewer pipeline connections than concurrent searches: on a shared pool the searches
    # would hold every connection and nothing would be taken in or sent.
    settings = make_settings(
        internal_http_addr="127.0.0.1:0",
        postgres_pool_min=2,
        postgres_pool_max=4,
        api_pool_max=2,
        api_statement_timeout="1s",
    )
    db = Db(settings.dsn)
    blocker = await asyncpg.connect(settings.dsn)
    try:
        async with running_app(settings) as app, aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{app.http_port}"
            # Lock contention: every audit-trail search now waits until its timeout.
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("LOCK TABLE mail.operator_actions IN ACCESS EXCLUSIVE MODE")
            searches = [
                asyncio.create_task(_get(session, f"{base}{P}/operator-actions?actor=x{n}"))
                for n in range(10)
            ]

            async def api_pool_saturated() -> bool:
                waiting = await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                    "'maildaemon-api' AND wait_event_type = 'Lock'"
                )
                return bool(waiting == 2)

            await wait_for(api_pool_saturated, timeout=10)
            await xadd(settings, *(command(f"d-{n}", idempotency_key=f"k{n}") for n in range(5)))
            for n in range(5):
                await db.wait_status(f"d-{n}", "sent", timeout=10)
            assert not all(s.done() for s in searches), "the searches were still stuck"
            assert len(smtp_sink.messages) == 5
            # Reads that do not wait on the lock still answer, on the same small pool.
            status, stats = await _get(session, f"{base}{P}/stats")
            assert status == 200 and stats["deliveries_by_status"]["sent"] == 5

            results = await asyncio.wait_for(asyncio.gather(*searches), 30)
            await tx.rollback()
            for status, body in results:
                assert status == 503, body
                assert body["error"]["code"] == "query_timeout"
                assert "MAIL_API_STATEMENT_TIMEOUT (1s)" in body["error"]["message"]
            status, page = await _get(session, f"{base}{P}/operator-actions")
            assert status == 200 and page["items"] == []
    finally:
        await blocker.close()


async def test_reads_need_a_token_when_a_read_token_is_set(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = make_settings(
        internal_http_addr="127.0.0.1:0",
        operator_token=TOKEN,
        operator_read_token=READ_TOKEN,
    )
    async with running_app(settings) as app, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{app.http_port}"
        for path in ("/healthz", "/readyz", f"{P}/openapi.json"):
            status, _ = await _get(session, base + path)
            assert status == 200, path
        for path in (f"{P}/malformed-commands", f"{P}/stats", f"{P}/deliveries/d-1"):
            status, body = await _get(session, base + path)
            assert status == 401 and body["error"]["code"] == "unauthorized", path
            status, body = await _get(session, base + path, "wrong-token")
            assert status == 401, path
        for token in (READ_TOKEN, TOKEN):
            status, _ = await _get(session, f"{base}{P}/malformed-commands", token)
            assert status == 200
        # The read token reads; it does not act.
        headers = {"Authorization": f"Bearer {READ_TOKEN}"}
        async with session.post(f"{base}{P}/sending/pause", json={}, headers=headers) as resp:
            assert resp.status == 401
        status, state = await _get(session, f"{base}{P}/sending", READ_TOKEN)
        assert status == 200 and state["pauses"] == []


async def test_recipient_searches_use_their_index(pg_dsn: str) -> None:
    """On 60,000 deliveries (20,000 dead letters), recipient and domain searches are index
    scans, as EXPLAIN shows for the very statements the API runs."""
    setup = await asyncpg.connect(pg_dsn)
    try:
        await setup.execute(
            """
            INSERT INTO mail.deliveries (delivery_id, source, idempotency_key, command_hash,
                status, payload_mode, to_addrs, cc_addrs, created_at)
            SELECT 'd-' || n, 'authsession', 'k-' || n, '\\x00',
                CASE WHEN n % 3 = 0 THEN 'dead_letter' ELSE 'sent' END, 'template',
                ARRAY['User' || n || '@Domain' || (n % 5000) || '.example'],
                ARRAY['cc' || n || '@copies.example'],
                now() - make_interval(secs => n)
            FROM generate_series(1, 60000) AS n;
            INSERT INTO mail.dead_letters (delivery_id, attempt_count, last_status)
            SELECT delivery_id, 2, 'transport_failed' FROM mail.deliveries
            WHERE status = 'dead_letter';
            ANALYZE mail.deliveries;
            ANALYZE mail.dead_letters;
            """
        )
    finally:
        await setup.close()
    # The API's pool: statement timeout and plans for the parameters given.
    store = await Store.open(pg_dsn, min_size=1, max_size=1, statement_timeout=5)
    try:
        async with store.pool.acquire() as conn:
            args = (None, None, "user4242@domain4242.example", None, None, None, None, 50)
            statement = q.LIST_DELIVERIES_BY_RECIPIENT
            plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {statement}", *args)
            assert "delivery_recipients_pkey" in plan, json.dumps(json.loads(plan), indent=1)
            assert "Seq Scan" not in plan

            flt = DeadLetterFilter(recipient_domain="domain4242.example")
            dl = (*dl_args(flt), None, None, None, 50)
            plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {q.LIST_DEAD_LETTERS}", *dl)
            assert "delivery_recipients_domain_idx" in plan, plan
            rows = await conn.fetch(q.LIST_DEAD_LETTERS, *dl)
            expected = {f"d-{n}" for n in range(4242, 60001, 5000) if n % 3 == 0}
            assert {r["delivery_id"] for r in rows} == expected and expected
        # What the API runs for ?recipient=: case-insensitive, cc included, one statement.
        reads = OperatorReads(store.pool)
        for recipient in ("user4242@domain4242.example", "cc4242@copies.example"):
            page = await reads.deliveries(DeliveryFilter(recipient=recipient), PageRequest())
            assert [d.delivery_id for d in page.items] == ["d-4242"], recipient
        page = await reads.deliveries(
            DeliveryFilter(recipient="user4242@domain4242.example", status="sent"),
            PageRequest(),
        )
        assert page.items == []  # d-4242 is a dead letter: the other filters still apply
    finally:
        await store.close()
