"""No single row or reply stops delivery: each component meets data planted to break it.

Every case runs the real daemon against real PostgreSQL, Redis and a STARTTLS sink, plants
one poison (a row PostgreSQL holds but Python cannot read, a payload that is no command, an
outcome event that is no JSON object, two refusals of one dead address in one result batch),
and asserts two things a user sees: the poisoned delivery ends with its cause on record (or
is delivered, where the value can be read after all), and every other delivery is delivered
meanwhile — the daemon never exits.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from maildaemon.config import Settings
from maildaemon.delivery import AttemptResult, RecipientOutcome
from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.errors import StoreRejected
from maildaemon.sending.pipelined import PipeliningConnection
from maildaemon.store.pipeline.db import Store
from tests.support import Db, command, ingest_one, redis_client, running_app, wait_for, xadd

MakeSettings = Callable[..., Settings]
P = "/api/v1/internal"


async def _plant(settings: Settings, *docs: dict[str, object]) -> None:
    store = await Store.open(settings.dsn, min_size=1, max_size=2)
    try:
        for doc in docs:
            await ingest_one(store, doc)
    finally:
        await store.close()


async def _lookup(settings: Settings, delivery_id: str) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{settings.internal_http_addr}{P}/deliveries/{delivery_id}") as resp,
    ):
        return resp.status, await resp.json()


async def test_instants_beyond_pythons_range_neither_stop_claims_nor_lookups(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    """A far expires_at and an ancient send_at, as an older release let in: the scheduler
    claims and delivers them (a value past Python's range reads as its end), the lookup
    answers 200, and the delivery next to them goes out too."""
    settings = make_settings()
    db = Db(settings.dsn)
    await _plant(settings, command("far-expiry"), command("ancient-send"))
    await db.fetch(
        "UPDATE mail.deliveries SET expires_at = '294000-01-01 00:00:00+00' "
        "WHERE delivery_id = 'far-expiry'"
    )
    await db.fetch(
        "UPDATE mail.deliveries SET send_at = '4000-01-01 00:00:00+00 BC', "
        "next_attempt_at = '4000-01-01 00:00:00+00 BC' WHERE delivery_id = 'ancient-send'"
    )
    async with running_app(settings):
        await xadd(settings, command("neighbour"))
        for delivery_id in ("far-expiry", "ancient-send", "neighbour"):
            await db.wait_status(delivery_id, "sent")
        status, body = await _lookup(settings, "far-expiry")
        assert status == 200, body
        assert str(body["expires_at"]).startswith("9999-12-31T23:59:59")
        status, body = await _lookup(settings, "ancient-send")
        assert status == 200, body
        status, body = await _lookup(settings, "neighbour")
        assert status == 200 and body["failure_code"] is None, body
    assert len(smtp_sink.messages) == 3


async def test_a_payload_that_is_no_command_ends_its_delivery_only(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    """The stored command replaced by a JSON array (unreadable) and by an object the
    renderer cannot use: each delivery ends `failed` with its failure code and reason;
    the neighbour is delivered; the daemon exits 0."""
    settings = make_settings()
    db = Db(settings.dsn)
    await _plant(settings, command("array-payload"), command("odd-payload"))
    await db.fetch(
        "UPDATE mail.delivery_payloads SET command = '[1, 2, 3]' "
        "WHERE delivery_id = 'array-payload'"
    )
    await db.fetch(
        """UPDATE mail.delivery_payloads SET command = '{"to": 5, "variables": []}'"""
        " WHERE delivery_id = 'odd-payload'"
    )
    async with running_app(settings):
        await xadd(settings, command("neighbour"))
        await db.wait_status("neighbour", "sent")
        assert await db.wait_status("array-payload", "failed") == "failed"
        assert await db.wait_status("odd-payload", "failed") == "failed"
    rows = await db.fetch(
        "SELECT delivery_id, failure_code, status_reason FROM mail.deliveries "
        "WHERE delivery_id IN ('array-payload', 'odd-payload') ORDER BY delivery_id"
    )
    assert rows[0]["failure_code"] == "store_unreadable"
    assert "not an object" in rows[0]["status_reason"]
    assert rows[1]["status_reason"]  # the render fault, with its cause
    assert [m.rcpt_tos for m in smtp_sink.messages] == [["alice@example.com"]]


async def test_two_refusals_of_one_dead_address_in_one_batch_are_both_recorded(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    """Mail to a dead address arrives in pairs: refusals that land in one result batch are
    all recorded, the address suppressed once, the rest delivered (the batch itself is
    pinned down deterministically in the next test, at the store)."""
    for _ in range(6):
        smtp_sink.behaviour.rcpt_replies.setdefault("gone@example.com", []).append(
            "550 5.1.1 <gone@example.com>: mailbox unavailable"
        )
    settings = make_settings(attempt_worker_concurrency=4)
    db = Db(settings.dsn)
    dead = [command(f"dead-{i}", to=[{"address": "gone@example.com"}]) for i in range(6)]
    await _plant(settings, *dead)
    async with running_app(settings):
        await xadd(settings, command("neighbour"))
        for i in range(6):
            await db.wait_status(f"dead-{i}", "failed", "suppressed")
        await db.wait_status("neighbour", "sent")
    refused = await db.fetchval(
        "SELECT count(*) FROM mail.attempts WHERE reply_code = 550 AND status <> 'started'"
    )
    assert refused >= 2  # at least two refusals reached the writer (six were planted)
    suppressed = await db.fetch(
        "SELECT address, reply_code FROM mail.suppressions WHERE address = 'gone@example.com'"
    )
    assert [(r["address"], r["reply_code"]) for r in suppressed] == [("gone@example.com", 550)]


async def test_unstorable_reply_text_and_one_dead_address_twice_are_stored_in_one_batch(
    make_settings: MakeSettings,
) -> None:
    """Two results in one batch, each with text PostgreSQL cannot store as it is (a NUL and
    a lone surrogate, as a hostile relay's reply decodes) and each suppressing the same
    address: both are recorded with the text escaped, the address once."""
    settings = make_settings()
    db = Db(settings.dsn)
    await _plant(settings, command("hostile"), command("good"))
    store = await Store.open(settings.dsn, min_size=1, max_size=2)
    try:
        claims = await store.claim_due(10, 60, "test-worker")
        assert len(claims) == 2
        now = datetime.now(UTC)
        text = "Empf\udce4nger\x00 unbekannt"
        results = [
            AttemptResult(
                delivery_id=c.delivery_id,
                source=c.source,
                claim_token=c.claim_token,
                attempt_no=c.attempt_no,
                attempt_status="provider_rejected",
                delivery_status="failed",
                started_at=now,
                finished_at=now,
                reply_code=550,
                reply_text=text,
                recipients={"alice@example.com": RecipientOutcome("refused", 550, text)},
                status_reason=text,
                suppress=("alice@example.com",),
            )
            for c in claims
        ]
        recorded = await store.record_results(results, "test-worker", 3600)
    finally:
        await store.close()
    assert recorded == {"hostile", "good"}
    rows = await db.fetch("SELECT reply_text FROM mail.attempts WHERE status <> 'started'")
    assert {r["reply_text"] for r in rows} == {"Empf\\udce4nger\\x00 unbekannt"}
    event = json.loads(await db.fetchval("SELECT fields FROM mail.outbox LIMIT 1"))
    assert event["reply_text"] == "Empf\\udce4nger\\x00 unbekannt"


async def test_an_outbox_row_that_is_no_event_is_published_as_malformed_and_the_rest_flows(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    """Outbox rows of every odd shape (an array, nesting, a boolean, an empty object)
    reach the event stream in order, and the outcome events behind them follow."""
    settings = make_settings()
    db = Db(settings.dsn)
    odd = ["[1, 2]", '{"nested": {"a": [1]}, "flag": true, "none": null}', "{}"]
    for fields in odd:
        await db.fetch(
            "INSERT INTO mail.outbox (delivery_id, fields) VALUES ('odd', $1::jsonb)", fields
        )
    client = redis_client(settings.redis_master_addr)
    try:
        async with running_app(settings):
            await xadd(settings, command("after-odd"))
            await db.wait_status("after-odd", "sent")

            async def published() -> list[dict[bytes, bytes]]:
                entries = await client.xrange(settings.event_stream)
                done = any(f.get(b"delivery_id") == b"after-odd" for _, f in entries)
                return [f for _, f in entries] if done else []

            entries = await wait_for(published)
    finally:
        await client.aclose()
    assert entries[0] == {b"malformed_event": b"[1, 2]"}
    assert entries[1][b"flag"] == b"true" and entries[1][b"nested"] == b'{"a": [1]}'
    assert entries[2] == {b"malformed_event": b"{}"}
    assert entries[-1][b"status"] == b"sent"


async def test_every_component_keeps_delivering_while_the_poisons_sit_in_the_database(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    """All the poisons at once, and a stream of ordinary mail behind them: every ordinary
    delivery is sent, every poisoned one has ended, the daemon stops cleanly."""
    settings = make_settings()
    db = Db(settings.dsn)
    await _plant(settings, command("p-array"), command("p-far"))
    await db.fetch("UPDATE mail.delivery_payloads SET command = '7' WHERE delivery_id='p-array'")
    await db.fetch(
        "UPDATE mail.deliveries SET expires_at = 'infinity', next_attempt_at = '-infinity' "
        "WHERE delivery_id = 'p-far'"
    )
    await db.fetch("INSERT INTO mail.outbox (delivery_id, fields) VALUES ('x', '\"text\"')")
    async with running_app(settings):
        await xadd(settings, *(command(f"ok-{i}") for i in range(20)))
        for i in range(20):
            await db.wait_status(f"ok-{i}", "sent")
        await db.wait_status("p-array", "failed")
        await db.wait_status("p-far", "sent")
        await asyncio.sleep(0)  # the daemon is still running: running_app checks exit 0
    assert len(smtp_sink.messages) == 21


async def test_a_fault_inside_one_send_retries_that_delivery_and_spares_the_worker(
    make_settings: MakeSettings, smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the SMTP client raises an unexpected error for one recipient's
    mail (a reply it cannot parse, a bug). That attempt is recorded (`attempt_fault`) and
    retried on the ladder to its end; every other delivery goes out on the same workers."""
    original = PipeliningConnection.send

    async def send(
        self: PipeliningConnection,
        sender: str,
        rcpts: Any,
        message: bytes,
        envid: str | None = None,
    ) -> Any:
        if "boom@example.com" in rcpts:
            raise ValueError("reply line the client cannot parse")
        return await original(self, sender, rcpts, message, envid)

    monkeypatch.setattr(PipeliningConnection, "send", send)
    settings = make_settings(attempt_worker_concurrency=1)
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(
            settings,
            command("boom", to=[{"address": "boom@example.com"}]),
            *(command(f"after-{i}") for i in range(5)),
        )
        for i in range(5):
            await db.wait_status(f"after-{i}", "sent")
        await db.wait_status("boom", "dead_letter", timeout=30)
    attempts = await db.finished_attempts("boom")
    assert [a["status"] for a in attempts] == ["transport_failed"] * 3
    assert all("unexpected fault" in a["reply_text"] for a in attempts)
    assert (
        await db.fetchval("SELECT failure_code FROM mail.deliveries WHERE delivery_id = 'boom'")
        == "attempt_fault"
    )


async def test_a_claim_whose_preparation_fails_alone_is_ended_and_its_batch_goes_on(
    make_settings: MakeSettings, smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: PostgreSQL refuses the suppression lookup whenever one address is
    in it. The claim batch holding it is prepared claim by claim: that delivery ends
    `failed` (`unprocessable`), the others of the same batch are sent."""
    original = Store.active_suppressions

    async def lookup(self: Store, addresses: Any) -> dict[str, str]:
        given = list(addresses)
        if "poison@example.com" in given:
            raise StoreRejected("suppressions: PostgreSQL refused the data: injected")
        return await original(self, given)

    monkeypatch.setattr(Store, "active_suppressions", lookup)
    settings = make_settings()
    db = Db(settings.dsn)
    await _plant(
        settings,
        command("poison", to=[{"address": "poison@example.com"}]),
        *(command(f"batch-{i}") for i in range(4)),
    )
    async with running_app(settings):
        for i in range(4):
            await db.wait_status(f"batch-{i}", "sent")
        await db.wait_status("poison", "failed")
    row = (
        await db.fetch(
            "SELECT failure_code, status_reason FROM mail.deliveries WHERE delivery_id='poison'"
        )
    )[0]
    assert row["failure_code"] == "unprocessable"
    assert "injected" in row["status_reason"]
