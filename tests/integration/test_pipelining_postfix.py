"""The pipelined transaction against a real MTA: Postfix, started by the test in a
temporary directory with STARTTLS required (``smtpd_tls_security_level = encrypt``),
delivering to a maildir; PIPELINING and CHUNKING offered or taken away with
``smtpd_discard_ehlo_keywords``. Skipped (with the reason) without root or Postfix."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from maildaemon.errors import InsecureTransportError, MessageTooLarge
from maildaemon.sending.pipelined import PipeliningConnection
from maildaemon.sending.reply import SendReport
from maildaemon.sending.smtp import tls_context
from tests.integration.test_pipelining import MESSAGE, settings_for
from tests.integration.test_pipelining_ahead import Worker
from tests.postfix import NEEDED, SIZE_LIMIT, VARIANTS, Postfix, running_postfix

pytestmark = NEEDED


@pytest.fixture
def postfix(postfix_server: Postfix) -> Postfix:
    postfix_server.mark()
    return postfix_server


@pytest.fixture(scope="module", params=list(VARIANTS))
def postfix_server(request: pytest.FixtureRequest) -> Iterator[Postfix]:
    with running_postfix("", "", extensions=request.param) as server:
        yield server


def connection(postfix: Postfix, **overrides: object) -> PipeliningConnection:
    settings = settings_for(postfix.port, postfix.ca_file, **overrides)
    return PipeliningConnection(settings, tls_context(settings))


async def _send_with_retry(
    conn: PipeliningConnection, rcpts: list[str], message: bytes
) -> SendReport:
    # Postfix's master may take a moment to accept after `postfix start` returns.
    for _ in range(50):
        try:
            return await conn.send("noreply@test.example", rcpts, message)
        except OSError:
            await asyncio.sleep(0.1)
    return await conn.send("noreply@test.example", rcpts, message)


async def test_postfix_delivers_pipelined_messages_intact(postfix: Postfix) -> None:
    conn = connection(postfix)
    try:
        for i in range(3):
            message = MESSAGE.replace(b"<m1@", b"<m%d@" % i)
            report = await _send_with_retry(conn, ["ok@example.com"], message)
            assert report.data_reply is not None and report.data_reply.code == 250
            assert "queued as" in report.data_reply.text
        assert conn.pipelining == (postfix.extensions != "neither")
    finally:
        await conn.close()
    delivered = await postfix.wait_delivered(3)
    for raw in delivered:
        assert raw.endswith(MESSAGE.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))
        assert b"(using TLS" in raw  # Postfix's Received header: it came over TLS
    log = postfix.log()
    assert log.count("TLS connection established") == 1 and log.count(" connect from ") == 1


async def test_postfix_partial_and_total_refusal(postfix: Postfix) -> None:
    conn = connection(postfix)
    try:
        report = await _send_with_retry(
            conn, ["gone@example.com", "ok@example.com", "later@example.com"], MESSAGE
        )
        assert list(report.accepted) == ["ok@example.com"]
        assert report.refused["gone@example.com"].code == 550
        assert report.deferred["later@example.com"].code == 450
        assert report.data_reply is not None
        report = await conn.send("noreply@test.example", ["gone@example.com"], MESSAGE)
        assert report.accepted == {} and report.data_reply is None
        assert report.refused["gone@example.com"].code == 550
        report = await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)
        assert report.data_reply is not None  # the same connection, after RSET
    finally:
        await conn.close()
    assert len(await postfix.wait_delivered(2)) == 2
    assert postfix.log().count("TLS connection established") == 1


async def test_postfix_reconnects_after_it_closed_the_connection(postfix: Postfix) -> None:
    conn = connection(postfix)
    try:
        assert (await _send_with_retry(conn, ["ok@example.com"], MESSAGE)).data_reply
        await asyncio.sleep(3)  # smtpd_timeout: Postfix says 421 and closes the idle link
        assert (await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)).data_reply
    finally:
        await conn.close()
    assert len(await postfix.wait_delivered(2)) == 2
    log = postfix.log()
    assert "timeout after" in log and log.count(" connect from ") == 2


async def test_postfix_certificate_not_trusted_nothing_sent(
    postfix: Postfix, tmp_path: Path
) -> None:
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    conn = connection(postfix, smtp_ca_file=other)
    with pytest.raises(InsecureTransportError):
        await _send_with_retry(conn, ["ok@example.com"], MESSAGE)
    await asyncio.sleep(0.5)
    assert postfix.delivered() == []


async def test_postfix_size_limit_refused_before_sending(postfix: Postfix) -> None:
    """Postfix offers SIZE 200000: a message over it is refused here, before MAIL FROM, and
    the connection goes on; a smaller one goes out with SIZE= declared and is delivered.
    (Postfix counts the headers it adds against its limit too, so "fits" is well under.)"""
    fits = MESSAGE + b"x" * (SIZE_LIMIT // 2) + b"\r\n"
    conn = connection(postfix)
    try:
        assert (await _send_with_retry(conn, ["ok@example.com"], fits)).data_reply
        with pytest.raises(MessageTooLarge) as info:
            await conn.send("noreply@test.example", ["ok@example.com"], b"x" * (SIZE_LIMIT + 1))
        assert (info.value.size, info.value.limit) == (SIZE_LIMIT + 1, SIZE_LIMIT)
        assert (await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)).data_reply
    finally:
        await conn.close()
    assert len(await postfix.wait_delivered(2)) == 2
    assert postfix.log().count(" connect from ") == 1  # the refusal kept the session


async def test_postfix_takes_each_envelope_sent_behind_the_previous_data(
    postfix: Postfix,
) -> None:
    """Back to back with the next envelope behind each message's data (on the PIPELINING
    variants; one command at a time without): each message arrives once, intact, and a
    refusal in the middle stays with its own message."""
    conn = connection(postfix)
    rcpts = [["ok@example.com"]] * 3 + [["gone@example.com"]] + [["ok@example.com"]] * 3
    messages = [MESSAGE.replace(b"<m1@", b"<ahead%d@" % i) for i in range(len(rcpts))]
    await _send_with_retry(conn, ["ok@example.com"], MESSAGE)  # connected, Postfix ready
    envelopes = [("noreply@test.example", r, m, None) for r, m in zip(rcpts, messages, strict=True)]
    worker = Worker(conn, envelopes)
    try:
        outcomes = await worker.run()
    finally:
        await conn.close()
    assert all(isinstance(o, SendReport) for o in outcomes)
    reports = [o for o in outcomes if isinstance(o, SendReport)]
    assert [r.data_reply is not None for r in reports] == [True] * 3 + [False] + [True] * 3
    assert reports[3].refused["gone@example.com"].code == 550
    if postfix.extensions == "pipelining":
        assert worker.taken_ahead >= 5  # no successor for the refused one nor the last
    delivered = await postfix.wait_delivered(7)
    ids = sorted(
        line for raw in delivered for line in raw.split(b"\n") if line.startswith(b"Message-ID: <")
    )
    assert ids == sorted(
        [b"Message-ID: <m1@test.example>"]
        + [b"Message-ID: <ahead%d@test.example>" % i for i in (0, 1, 2, 4, 5, 6)]
    )
