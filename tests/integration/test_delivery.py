"""Delivery end to end: stream command → PostgreSQL → SMTP (STARTTLS) → recorded outcome."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from maildaemon.config import Settings
from maildaemon.devstack.smtp_script import DROP
from maildaemon.devstack.smtp_sink import SmtpSink
from tests.support import Db, command, ingest_one, redis_client, running_app, wait_for, xadd

MakeSettings = Callable[..., Settings]
REPO = Path(__file__).resolve().parents[2]


async def test_template_command_arrives_as_correct_mime_over_tls(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = make_settings()
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(
            settings,
            command(
                "d-1",
                cc=["carol@example.com"],
                bcc=["hidden@example.com"],
                reply_to={"address": "help@example.com", "name": "Help Desk"},
                headers={"X-Entity-Ref-ID": "ref-1"},
            ),
        )
        await db.wait_status("d-1", "sent")
    assert len(smtp_sink.messages) == 1
    received = smtp_sink.messages[0]
    assert received.tls is True
    assert received.mail_from == "noreply@test.example"
    assert sorted(received.rcpt_tos) == [
        "alice@example.com",
        "carol@example.com",
        "hidden@example.com",
    ]
    msg = received.parse()
    assert msg["To"].addresses[0].display_name == "Alice Ämmerle"
    assert msg["Cc"].addresses[0].addr_spec == "carol@example.com"
    assert msg["Reply-To"].addresses[0].display_name == "Help Desk"
    assert msg["From"].addresses[0].addr_spec == "noreply@test.example"
    assert msg["X-Entity-Ref-ID"] == "ref-1"
    assert msg["Bcc"] is None and b"hidden@example.com" not in received.data
    assert msg["Message-ID"] and msg["Date"]
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None and "493817" in text.get_content()
    assert html is not None and "493817" in html.get_content()
    row = (await db.fetch("SELECT * FROM mail.deliveries WHERE delivery_id = 'd-1'"))[0]
    assert row["message_id"] == msg["Message-ID"]
    assert row["content_hash"] and row["rendered_at"] and row["finished_at"]
    attempts = await db.attempts("d-1")
    assert [(a["attempt_no"], a["status"], a["reply_code"]) for a in attempts] == [(1, "sent", 250)]


async def test_server_without_starttls_gets_nothing_in_clear(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    smtp_sink.behaviour.offer_starttls = False
    settings = make_settings(retry_ladder="30s")
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("d-clear"))
        await wait_for(lambda: db.finished_attempts("d-clear"))
    assert smtp_sink.messages == []
    attempt = (await db.attempts("d-clear"))[0]
    assert attempt["status"] == "transport_failed"
    assert "STARTTLS" in attempt["reply_text"]
    assert await db.status("d-clear") == "queued"  # retry scheduled, nothing sent


async def test_transient_failures_then_success(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    smtp_sink.behaviour.rcpt_replies["alice@example.com"] = [
        "451 4.3.0 try again later",
        "451 4.3.0 try again later",
    ]
    settings = make_settings(retry_ladder="0.2s,0.2s,0.2s", retry_jitter=0)
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("d-retry"))
        await db.wait_status("d-retry", "sent")
    attempts = await db.attempts("d-retry")
    assert [(a["status"], a["reply_code"]) for a in attempts] == [
        ("transport_failed", 451),
        ("transport_failed", 451),
        ("sent", 250),
    ]
    assert len(smtp_sink.messages) == 1


async def test_ladder_exhausted_becomes_dead_letter(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    smtp_sink.behaviour.rcpt_replies["alice@example.com"] = ["452 4.2.2 mailbox full"] * 10
    settings = make_settings(retry_ladder="0.1s,0.1s", retry_jitter=0)
    db = Db(settings.dsn)
    redis = redis_client(settings.redis_master_addr)
    async with running_app(settings):
        await xadd(settings, command("d-dead"))
        await db.wait_status("d-dead", "dead_letter")
    assert [a["status"] for a in await db.attempts("d-dead")] == ["transport_failed"] * 3
    dead = await db.fetch("SELECT * FROM mail.dead_letters WHERE delivery_id = 'd-dead'")
    assert len(dead) == 1 and dead[0]["last_reply_code"] == 452
    assert dead[0]["attempt_count"] == 3
    events = await redis.xrange(settings.event_stream)
    await redis.aclose()
    statuses = [e[1][b"status"].decode() for e in events]
    assert statuses == ["retry_scheduled", "retry_scheduled", "dead_letter"]


async def test_permanent_rejection_suppresses_without_retry_and_next_time_skips_server(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    smtp_sink.behaviour.rcpt_replies["alice@example.com"] = ["550 5.1.1 unknown user"]
    settings = make_settings()
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("d-550"))
        await db.wait_status("d-550", "suppressed")
        connections_before = smtp_sink.connections_opened
        await xadd(settings, command("d-again", idempotency_key="other"))
        await db.wait_status("d-again", "suppressed")
    attempts = await db.attempts("d-550")
    assert [(a["status"], a["reply_code"]) for a in attempts] == [("provider_rejected", 550)]
    assert (
        await db.fetchval(
            "SELECT count(*) FROM mail.suppressions WHERE address = 'alice@example.com'"
        )
        == 1
    )
    assert await db.attempts("d-again") == []  # no connection, no attempt
    assert smtp_sink.connections_opened == connections_before
    reason = await db.fetchval(
        "SELECT status_reason FROM mail.deliveries WHERE delivery_id = 'd-again'"
    )
    assert "suppression list" in reason
    assert smtp_sink.messages == []


async def _ingest_unchecked(settings: Settings, doc: dict[str, Any]) -> None:
    """Take a command in without the catalog check, as an older daemon did."""
    from maildaemon.store.pipeline.db import Store

    store = await Store.open(settings.dsn, min_size=1, max_size=1)
    try:
        await ingest_one(store, doc)
    finally:
        await store.close()


async def test_missing_template_variable_fails_at_once(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    """Intake refuses such a command (missing_variable); one accepted before the template
    changed (taken in here without the catalog check) fails at render, at once."""
    settings = make_settings()
    db = Db(settings.dsn)
    async with running_app(settings):
        [entry_id] = await xadd(settings, command("d-var-new", variables={"code": "1"}))
        await _ingest_unchecked(settings, command("d-var", variables={"code": "1"}))
        await db.wait_status("d-var", "failed")
    reason = await db.fetchval(
        "SELECT status_reason FROM mail.deliveries WHERE delivery_id = 'd-var'"
    )
    assert "expires_minutes" in reason and "needs variable" in reason
    code = await db.fetchval(
        "SELECT failure_code FROM mail.malformed_commands WHERE stream_entry_id = $1", entry_id
    )
    assert code == "missing_variable"
    assert [a["status"] for a in await db.attempts("d-var")] == ["failed"]
    assert smtp_sink.messages == []


async def test_server_closing_connection_between_messages_reconnects(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    smtp_sink.behaviour.close_after_messages = 1
    settings = make_settings(attempt_worker_concurrency=1)
    db = Db(settings.dsn)
    async with running_app(settings):
        for i in range(3):
            await xadd(settings, command(f"d-close-{i}"))
            await db.wait_status(f"d-close-{i}", "sent")
    assert len(smtp_sink.messages) == 3
    for i in range(3):
        assert [a["status"] for a in await db.attempts(f"d-close-{i}")] == ["sent"]


async def test_send_at_in_the_future_is_honoured(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = make_settings(scheduler_poll_interval="5s")
    db = Db(settings.dsn)
    async with running_app(settings):
        send_at = datetime.now(UTC) + timedelta(seconds=2)
        await xadd(settings, command("d-later", send_at=send_at.isoformat()))
        await db.wait_status("d-later", "sent", timeout=10)
        # Not before its time: the attempt's own record says when it began.
        (attempt,) = await db.attempts("d-later")
        assert attempt["started_at"] >= send_at
    attempt = (await db.attempts("d-later"))[0]
    assert attempt["started_at"] >= send_at
    assert attempt["started_at"] - send_at < timedelta(seconds=1.5)


async def test_retry_sends_the_bytes_rendered_first(
    make_settings: MakeSettings, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    catalog = tmp_path / "templates"
    shutil.copytree(REPO / "templates", catalog)
    smtp_sink.behaviour.rcpt_replies["alice@example.com"] = ["451 4.3.0 later"]
    settings = make_settings(template_dir=catalog, retry_ladder="1s", retry_jitter=0)
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("d-pin"))
        await wait_for(lambda: db.finished_attempts("d-pin"))
    subject = catalog / "signin_code" / "en" / "subject.txt"
    await asyncio.to_thread(subject.write_text, "A completely different subject {{ code }}\n")
    async with running_app(settings):
        await db.wait_status("d-pin", "sent")
    msg = smtp_sink.messages[0].parse()
    assert "different" not in str(msg["Subject"])
    assert "493817" in msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]


async def test_link_lost_after_data_is_unknown_then_retried_with_same_message_id(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    smtp_sink.behaviour.script["end of data"] = [DROP]
    settings = make_settings(retry_ladder="0.2s", retry_jitter=0)
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("d-unknown"))
        await db.wait_status("d-unknown", "sent")
    attempts = await db.attempts("d-unknown")
    assert [a["status"] for a in attempts] == ["unknown", "sent"]
    row = (await db.fetch("SELECT * FROM mail.deliveries WHERE delivery_id = 'd-unknown'"))[0]
    assert row["possible_duplicate"] is True
    # The sink saw the message twice (the first reply never arrived): same Message-ID.
    ids = {m.parse()["Message-ID"] for m in smtp_sink.messages}
    assert ids == {row["message_id"]}


async def test_unknown_outcome_can_be_held_for_review(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    smtp_sink.behaviour.script["end of data"] = [DROP]
    settings = make_settings(unknown_outcome_policy="hold")
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("d-hold"))
        await db.wait_status("d-hold", "dead_letter")
    assert [a["status"] for a in await db.attempts("d-hold")] == ["unknown"]


async def test_partial_acceptance_retries_only_deferred_recipients(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    smtp_sink.behaviour.rcpt_replies["bob@example.com"] = ["450 4.2.1 busy"]
    smtp_sink.behaviour.rcpt_replies["nobody@example.com"] = ["550 5.1.1 no such user"]
    settings = make_settings(retry_ladder="0.2s", retry_jitter=0)
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(
            settings,
            command("d-partial", to=["alice@example.com", "bob@example.com", "nobody@example.com"]),
        )
        await db.wait_status("d-partial", "sent")
        await wait_for(lambda: _count(db, "d-partial", 2))
    attempts = await db.attempts("d-partial")
    assert [a["status"] for a in attempts] == ["sent", "sent"]
    first = attempts[0]["recipients"]
    assert '"alice@example.com": {"code": 250' in first or "accepted" in first
    rcpts = [sorted(m.rcpt_tos) for m in smtp_sink.messages]
    assert rcpts == [["alice@example.com"], ["bob@example.com"]]


async def _count(db: Db, delivery_id: str, n: int) -> bool:
    return len(await db.finished_attempts(delivery_id)) >= n


async def test_expired_delivery_is_not_attempted(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = make_settings()
    db = Db(settings.dsn)
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    async with running_app(settings):
        await xadd(settings, command("d-exp", expires_at=past))
        await db.wait_status("d-exp", "expired")
    assert await db.attempts("d-exp") == []
    assert smtp_sink.messages == []


async def test_stub_mode_records_and_suppresses(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = make_settings(smtp_mode="stub")
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("d-stub"))
        await db.wait_status("d-stub", "suppressed")
    row = (await db.fetch("SELECT * FROM mail.deliveries WHERE delivery_id = 'd-stub'"))[0]
    assert "stub" in row["status_reason"] and row["rendered_at"] is not None
    assert smtp_sink.messages == []


async def test_event_stream_carries_every_outcome(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    smtp_sink.behaviour.rcpt_replies["rejected@example.com"] = ["550 5.1.1 unknown"]
    settings = make_settings()
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("e-sent"), command("e-supp", to=["rejected@example.com"]))
        # Accepted before its template changed: intake would now refuse it (missing_variable).
        await _ingest_unchecked(settings, command("e-fail", variables={}))
        for did, status in (("e-sent", "sent"), ("e-supp", "suppressed"), ("e-fail", "failed")):
            await db.wait_status(did, status)
    redis = redis_client(settings.redis_master_addr)
    events = await redis.xrange(settings.event_stream)
    await redis.aclose()
    seen: dict[str, dict[str, Any]] = {
        e[1][b"delivery_id"].decode(): {k.decode(): v.decode() for k, v in e[1].items()}
        for e in events
    }
    assert seen["e-sent"]["status"] == "sent" and seen["e-sent"]["reply_code"] == "250"
    assert seen["e-supp"]["status"] == "suppressed" and seen["e-supp"]["reply_code"] == "550"
    assert seen["e-fail"]["status"] == "failed"
    assert seen["e-sent"]["source"] == "authsession" and seen["e-sent"]["attempt"] == "1"


async def test_two_daemons_never_attempt_the_same_delivery_twice(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    base = make_settings(scheduler_batch_size=20, attempt_worker_concurrency=4)
    a = base.model_copy(update={"consumer_name": "replica-a"})
    b = base.model_copy(update={"consumer_name": "replica-b", "internal_http_addr": "127.0.0.1:0"})
    db = Db(base.dsn)
    async with running_app(a), running_app(b):
        await xadd(base, *[command(f"pair-{i}") for i in range(300)])
        await wait_for(
            lambda: db.fetchval("SELECT count(*) = 300 FROM mail.deliveries WHERE status = 'sent'"),
            timeout=60,
        )
    per_delivery = await db.fetch(
        "SELECT delivery_id, count(*) AS n, min(worker) AS w1, max(worker) AS w2 "
        "FROM mail.attempts GROUP BY delivery_id"
    )
    assert len(per_delivery) == 300 and all(r["n"] == 1 for r in per_delivery)
    assert {r["w1"] for r in per_delivery} == {"replica-a", "replica-b"}  # both took part
    ids = [m.parse()["Message-ID"] for m in smtp_sink.messages]
    assert len(ids) == 300 and len(set(ids)) == 300


async def test_a_worker_past_its_lease_cannot_overwrite_the_newer_attempt(
    make_settings: MakeSettings,
) -> None:
    from maildaemon.delivery import AttemptResult, ClaimedDelivery
    from maildaemon.store.pipeline.db import Store

    def result(claim: ClaimedDelivery, status: Literal["sent", "failed"]) -> AttemptResult:
        now = datetime.now(UTC)
        return claim.result(now, now, status, status, reply_text=f"{status} by {claim.claim_token}")

    settings = make_settings(smtp_mode="stub")
    db = Db(settings.dsn)
    store = await Store.open(settings.dsn)
    try:
        await ingest_one(store, command("fence"))
        [old] = await store.claim_due(10, 0.3, "slow-worker")
        await asyncio.sleep(0.5)  # the lease expires
        [new] = await store.claim_due(10, 60, "fast-worker")
        assert new.claim_token == old.claim_token + 1
        fresh, stale = result(new, "sent"), result(old, "failed")
        assert await store.record_results([fresh], "fast-worker", 60) == {"fence"}
        assert await store.record_results([stale], "slow-worker", 60) == set()
    finally:
        await store.close()
    assert await db.status("fence") == "sent"
    attempts = await db.attempts("fence")
    # The attempt the slow worker had open is on record, closed as `unknown` at the takeover.
    assert [(a["attempt_no"], a["worker"], a["status"]) for a in attempts] == [
        (1, "slow-worker", "unknown"),
        (2, "fast-worker", "sent"),
    ]
    assert (await db.fetch("SELECT possible_duplicate FROM mail.deliveries"))[0][0] is True


async def test_dkim_signature_covers_the_pinned_bytes(
    make_settings: MakeSettings, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    settings = make_settings(
        dkim_domain="test.example", dkim_selector="s1", dkim_private_key_file=key_file
    )
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("d-dkim"))
        await db.wait_status("d-dkim", "sent")
    data = smtp_sink.messages[0].data
    assert data.startswith(b"DKIM-Signature:")
    import base64 as b64

    record = b"v=DKIM1; k=rsa; p=" + b64.b64encode(public)

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s1._domainkey.test.example."
        return record

    assert dkim.verify(data, dnsfunc=dns)


async def test_implicit_tls_mode(make_settings: MakeSettings, smtp_ca: Any) -> None:
    async with SmtpSink(ca=smtp_ca, implicit_tls=True) as server:
        settings = make_settings(
            smtp_security="tls", smtp_addr=f"localhost:{server.port}", smtp_ca_file=server.ca_file
        )
        db = Db(settings.dsn)
        async with running_app(settings):
            await xadd(settings, command("d-465"))
            await db.wait_status("d-465", "sent")
    assert [(m.rcpt_tos, m.tls) for m in server.messages] == [(["alice@example.com"], True)]
    assert server.commands and all(c.tls for c in server.commands)  # TLS from the first byte
