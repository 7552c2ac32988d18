"""Reports after the relay's 250 reach the delivery record: parsed, matched by the signed
token, recorded raw, and applied through the one terminal-outcome writer — idempotently,
and never to a delivery they do not belong to."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import pytest

from maildaemon.config import Settings
from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.pipeline.reports import ReportIntake
from maildaemon.reports.model import Incoming, ReportRecord
from maildaemon.returnpath import ReturnPath
from maildaemon.store.pipeline.db import Store
from maildaemon.store.reports.db import ReportStore
from tests import reports_corpus as corpus
from tests.support import Db, command, running_app, xadd

MakeSettings = Callable[..., Settings]
SECRET = "s3cret-for-the-bounce-tests"
DOMAIN = "bounces.test.example"
RP = ReturnPath(DOMAIN, SECRET)
BOB = "bob@example.com"
CAROL = "carol@example.com"


class Loop:
    """Deliveries sent through the real daemon, then reports fed through the shared path."""

    def __init__(self, settings: Settings, sink: SmtpSink, store: Store) -> None:
        self.settings = settings
        self.sink = sink
        self.db = Db(settings.dsn)
        self.intake_store = ReportStore(store.pool)
        self.intake = ReportIntake(settings, self.intake_store)

    async def send(self, *docs: dict[str, object]) -> None:
        async with running_app(self.settings):
            await xadd(self.settings, *docs)
            for doc in docs:
                await self.db.wait_status(str(doc["delivery_id"]), "sent")

    def original(self, delivery_id: str) -> bytes:
        for m in self.sink.messages:
            if m.mail_from == RP.sender(delivery_id):
                return m.data
        raise AssertionError(f"{delivery_id} was not sent")

    async def report(self, raw: bytes, *envelope_to: str) -> ReportRecord:
        return await self.intake.take(Incoming(raw, "ingest", "", tuple(envelope_to), len(raw)))

    async def row(self, delivery_id: str) -> dict[str, object]:
        rows = await self.db.fetch(
            "SELECT status, status_reason FROM mail.deliveries WHERE delivery_id = $1",
            delivery_id,
        )
        return dict(rows[0])

    async def late(self, delivery_id: str) -> list[tuple[str, str, str | None]]:
        rows = await self.db.fetch(
            "SELECT address, outcome, status_code FROM mail.late_outcomes "
            "WHERE delivery_id = $1 ORDER BY address, outcome",
            delivery_id,
        )
        return [(r["address"], r["outcome"], r["status_code"]) for r in rows]

    async def suppressed(self) -> dict[str, str]:
        rows = await self.db.fetch("SELECT address, reason FROM mail.suppressions")
        return {r["address"]: r["reason"] for r in rows}

    async def events(self, delivery_id: str) -> list[dict[str, object]]:
        rows = await self.db.fetch(
            "SELECT fields FROM mail.outbox WHERE delivery_id = $1 ORDER BY id", delivery_id
        )
        return [json.loads(r["fields"]) for r in rows]


@pytest.fixture
async def loop(make_settings: MakeSettings, smtp_sink: SmtpSink) -> AsyncIterator[Loop]:
    smtp_sink.behaviour.dsn = True
    settings = make_settings(bounce_domain=DOMAIN, bounce_secret=SECRET)
    store = await Store.open(settings.dsn)
    try:
        yield Loop(settings, smtp_sink, store)
    finally:
        await store.close()


def one(to: str, **fields: object) -> dict[str, object]:
    return {"to": [{"address": to}], **fields}


def hard(
    address: str, status: str = "5.1.1", diag: str = "550 5.1.1 user unknown"
) -> list[tuple[str, str, str, str]]:
    return [(address, "failed", status, diag)]


async def test_a_hard_bounce_ends_the_delivery_bounced_and_suppresses_once(loop: Loop) -> None:
    await loop.send(command("b-1", **one(BOB)))
    raw = corpus.dsn(loop.original("b-1"), hard(BOB), to=RP.sender("b-1"))
    first = await loop.report(raw, RP.sender("b-1"))
    assert (first.kind, first.match_status, first.delivery_id) == ("bounce", "matched", "b-1")
    assert first.effects == (f"bounced {BOB}",)
    assert (await loop.row("b-1"))["status"] == "bounced"
    assert await loop.late("b-1") == [(BOB, "bounced", "5.1.1")]
    assert "5.1.1" in (await loop.suppressed())[BOB]
    bounced = [e for e in await loop.events("b-1") if e["status"] == "bounced"]
    assert len(bounced) == 1 and bounced[0]["recipient"] == BOB
    assert bounced[0]["delivery_status"] == "bounced" and bounced[0]["reply_code"] == 550
    # The same report again (the MTA retried): recorded once, nothing changes twice.
    again = await loop.report(raw, RP.sender("b-1"))
    assert again.duplicate and again.report_id == first.report_id and again.effects == ()
    assert len([e for e in await loop.events("b-1") if e["status"] == "bounced"]) == 1
    # The same bounce in another report (other bytes): no second effect or event either.
    other = await loop.report(raw.replace(b"inform you", b"tell you"), RP.sender("b-1"))
    assert not other.duplicate and other.match_status == "matched" and other.effects == ()
    assert len([e for e in await loop.events("b-1") if e["status"] == "bounced"]) == 1
    assert await loop.db.fetchval("SELECT count(*) FROM mail.reports") == 2


async def test_one_of_two_recipients_bounced_keeps_the_delivery_sent(loop: Loop) -> None:
    await loop.send(command("b-2", to=[{"address": BOB}, {"address": CAROL}]))
    await loop.report(corpus.dsn(loop.original("b-2"), hard(BOB), to=RP.sender("b-2")))
    assert (await loop.row("b-2"))["status"] == "sent"
    assert await loop.late("b-2") == [(BOB, "bounced", "5.1.1")]
    # The other one bounces later: now every recipient has.
    await loop.report(corpus.dsn(loop.original("b-2"), hard(CAROL), to=RP.sender("b-2")))
    assert (await loop.row("b-2"))["status"] == "bounced"


async def test_a_policy_bounce_is_recorded_but_not_suppressed(loop: Loop) -> None:
    await loop.send(command("b-3", **one(BOB)))
    raw = corpus.dsn(
        loop.original("b-3"), hard(BOB, "5.7.1", "550 5.7.1 spam"), to=RP.sender("b-3")
    )
    record = await loop.report(raw, RP.sender("b-3"))
    assert record.match_status == "matched"
    assert (await loop.row("b-3"))["status"] == "bounced"
    assert BOB not in await loop.suppressed()


async def test_a_delay_is_recorded_without_a_state_change(loop: Loop) -> None:
    await loop.send(command("b-4", **one(BOB)))
    raw = corpus.dsn(
        loop.original("b-4"),
        [(BOB, "delayed", "4.4.1", "451 4.4.1 try again later")],
        to=RP.sender("b-4"),
        subject="Delayed Mail (still being retried)",
    )
    record = await loop.report(raw, RP.sender("b-4"))
    assert (record.kind, record.match_status) == ("delay", "matched")
    assert (await loop.row("b-4"))["status"] == "sent"
    assert await loop.late("b-4") == [(BOB, "delayed", "4.4.1")]
    assert [e["status"] for e in await loop.events("b-4")][-1] == "delayed"
    assert await loop.suppressed() == {}


async def test_a_complaint_found_by_the_tracking_header_alone(loop: Loop) -> None:
    await loop.send(command("c-1", **one(BOB)))
    # Yahoo's FBL: not sent to our envelope, the recipient redacted; only the attached
    # original's X-Maildaemon-Ref says which delivery.
    record = await loop.report(corpus.arf(loop.original("c-1")), "fbl@elsewhere.example")
    assert (record.kind, record.match_status, record.delivery_id) == ("complaint", "matched", "c-1")
    assert await loop.late("c-1") == [(BOB, "complained", None)]
    assert (await loop.row("c-1"))["status"] == "sent"
    assert (await loop.suppressed())[BOB].startswith("complaint")
    assert [e["status"] for e in await loop.events("c-1")][-1] == "complained"


async def test_other_mtas_formats_are_matched_and_classified(loop: Loop) -> None:
    docs = [command(f"m-{i}", **one(f"user{i}@example.net")) for i in range(4)]
    await loop.send(*docs)
    cases = {
        "m-0": corpus.exim_bounce(loop.original("m-0"), "user0@example.net", RP.sender("m-0")),
        "m-1": corpus.exchange_dsn(loop.original("m-1"), "user1@example.net", RP.sender("m-1")),
        "m-2": corpus.gmail_dsn(loop.original("m-2"), "user2@example.net", RP.sender("m-2")),
        "m-3": corpus.arf(loop.original("m-3"), original_rcpt="user3@example.net"),
    }
    kinds = {}
    for delivery_id, raw in cases.items():
        record = await loop.report(raw)
        assert (record.match_status, record.delivery_id) == ("matched", delivery_id), raw[:300]
        kinds[delivery_id] = record.kind
    assert kinds == {"m-0": "bounce", "m-1": "bounce", "m-2": "bounce", "m-3": "complaint"}
    assert [await loop.db.status(f"m-{i}") for i in range(4)] == ["bounced"] * 3 + ["sent"]
    assert set(await loop.suppressed()) == {f"user{i}@example.net" for i in range(4)}
    rates = await loop.intake_store.rates(24)
    (source,) = rates.by_source
    assert (source.key, source.sent, source.bounced, source.complained) == (
        "authsession",
        4,
        3,
        1,
    )
    assert (source.bounce_rate, source.complaint_rate) == (0.75, 0.25)
    assert [(r.key, r.sent, r.bounced) for r in rates.by_recipient_domain] == [
        ("example.net", 4, 3)
    ]


async def test_forged_and_foreign_reports_change_nothing(loop: Loop) -> None:
    await loop.send(command("f-1", **one(BOB)), command("f-2", **one(CAROL)))
    original = loop.original("f-1")
    token = RP.token("f-1")
    forged_token = token[:-2] + ("aa" if token[-2:] != "aa" else "bb")
    forged = f"bounces+{forged_token}@{DOMAIN}"
    raw = corpus.dsn(original.replace(token.encode(), forged_token.encode()), hard(BOB), to=forged)
    record = await loop.report(raw, forged)
    assert (record.match_status, record.delivery_id) == ("bad_token", None)
    # A token signed with another secret, for f-2's reference: refused the same way.
    other = ReturnPath(DOMAIN, "not-the-secret-at-all").sender("f-2")
    record = await loop.report(corpus.dsn(b"Subject: x\r\n\r\n", hard(CAROL), to=other), other)
    assert record.match_status == "bad_token"
    # A report for another domain, no token anywhere.
    record = await loop.report(
        corpus.dsn(b"Subject: x\r\n\r\n", hard(BOB), to="x@other.example"), "x@other.example"
    )
    assert record.match_status == "unmatched"
    # A valid token of f-1 naming f-2's recipient: f-2 is not touched, nor is carol.
    record = await loop.report(corpus.dsn(original, hard(CAROL), to=RP.sender("f-1")))
    assert record.match_status == "matched" and record.effects == ()
    assert [await loop.db.status(d) for d in ("f-1", "f-2")] == ["sent", "sent"]
    assert await loop.late("f-1") == [] and await loop.late("f-2") == []
    assert await loop.suppressed() == {}


async def test_hostile_bytes_are_recorded_unparseable_or_unknown(loop: Loop) -> None:
    await loop.send(command("h-1", **one(BOB)))
    garbage = b"\x00\xff\xfe" * 1000
    assert (await loop.report(garbage)).match_status == "unparseable"
    broken = corpus.dsn(loop.original("h-1"), hard(BOB), to=RP.sender("h-1"))
    broken = broken.replace(b"Content-Type: message/delivery-status", b"Content-Type: text/x")
    record = await loop.report(broken, RP.sender("h-1"))
    assert record.match_status == "unparseable"
    deep = b"Content-Type: multipart/mixed; boundary=a\r\n\r\n" + b"--a\r\n" * 20000
    assert (await loop.report(deep)).match_status in ("unmatched", "unparseable")
    nested = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        for i in range(3000)
    )
    assert (await loop.report(nested)).match_status in ("unmatched", "unparseable")
    assert await loop.db.status("h-1") == "sent"
    assert await loop.db.fetchval("SELECT count(*) FROM mail.reports") == 4


async def test_a_bounce_of_a_bounce_and_an_auto_reply_do_nothing(loop: Loop) -> None:
    await loop.send(command("l-1", **one(BOB)))
    inner = corpus.dsn(loop.original("l-1"), hard(BOB), to=RP.sender("l-1"))
    outer = corpus.dsn(inner, hard(BOB), to=RP.sender("l-1"), headers_only=False)
    record = await loop.report(outer, RP.sender("l-1"))
    assert record.match_status == "matched" and record.effects == ()
    reply = await loop.report(corpus.auto_reply("hello", RP.sender("l-1")), RP.sender("l-1"))
    assert (reply.kind, reply.match_status, reply.effects) == ("auto_reply", "matched", ())
    assert await loop.db.status("l-1") == "sent" and await loop.late("l-1") == []
