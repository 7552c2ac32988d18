"""The dev SMTP server itself, driven over raw STARTTLS: what the pipelining, reply-matrix
and hostile-relay suites rely on when they script it (flights, BDAT, SIZE, recording,
reply then close)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import pytest

from maildaemon.devstack.smtp_script import CLOSE, SKIP
from maildaemon.devstack.smtp_sink import SmtpSink

Link = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One reply (every line of a multiline one): its code and its last line's text."""
    while True:
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line.endswith(b"\r\n"), line
        if line[3:4] == b" ":
            return int(line[:3]), line[4:-2]


@pytest.fixture
async def link(smtp_sink: SmtpSink) -> AsyncIterator[Link]:
    """A client past STARTTLS and the second EHLO, on a server with PIPELINING, CHUNKING
    and a SIZE limit of 100 octets."""
    smtp_sink.behaviour.pipelining = smtp_sink.behaviour.chunking = True
    smtp_sink.behaviour.size = 100
    reader, writer = await asyncio.open_connection(smtp_sink.host, smtp_sink.port)
    assert (await _reply(reader))[0] == 220
    writer.write(b"EHLO client.test\r\n")
    await _reply(reader)
    writer.write(b"STARTTLS\r\n")
    assert (await _reply(reader))[0] == 220
    await writer.start_tls(ssl.create_default_context(cafile=str(smtp_sink.ca_file)))
    writer.write(b"EHLO client.test\r\n")
    assert (await _reply(reader))[0] == 250
    yield reader, writer
    writer.close()


async def test_a_pipelined_bdat_flight_is_answered_in_one_write(
    smtp_sink: SmtpSink, link: Link
) -> None:
    reader, writer = link
    before = smtp_sink.flights
    first, last = b"Subject: x\r\n", b"\r\nchunked\r\n"
    writer.write(
        b"MAIL FROM:<a@test.example>\r\nRCPT TO:<b@example.com>\r\n"
        b"BDAT %d\r\n%sBDAT %d LAST\r\n%s" % (len(first), first, len(last), last)
    )
    codes = [(await _reply(reader))[0] for _ in range(4)]
    assert codes == [250, 250, 250, 250]
    assert smtp_sink.flights - before == 1
    assert [m.data for m in smtp_sink.messages] == [first + last]
    assert smtp_sink.transaction_verbs() == ["MAIL", "RCPT", "BDAT", "BDAT"]


async def test_one_command_at_a_time_is_one_write_each(smtp_sink: SmtpSink, link: Link) -> None:
    reader, writer = link
    before = smtp_sink.flights
    for command in (b"MAIL FROM:<a@test.example>", b"RCPT TO:<b@example.com>", b"DATA"):
        writer.write(command + b"\r\n")
        await _reply(reader)
    writer.write(b"Subject: x\r\n\r\n..dot\r\n.\r\n")
    assert (await _reply(reader))[0] == 250
    assert smtp_sink.flights - before == 4
    assert smtp_sink.messages[0].data == b"Subject: x\r\n\r\n.dot\r\n"


async def test_a_chunk_over_the_size_limit_is_refused(smtp_sink: SmtpSink, link: Link) -> None:
    reader, writer = link
    writer.write(b"MAIL FROM:<a@test.example>\r\nRCPT TO:<b@example.com>\r\n")
    writer.write(b"BDAT 101 LAST\r\n" + b"x" * 101)
    codes = [(await _reply(reader))[0] for _ in range(3)]
    assert codes == [250, 250, 552]
    assert smtp_sink.messages == []


async def test_message_bytes_where_a_command_belongs_are_recorded(
    smtp_sink: SmtpSink, link: Link
) -> None:
    reader, writer = link
    writer.write(b"From: a@test.example\r\n")
    assert (await _reply(reader))[0] == 500
    assert smtp_sink.transaction_verbs() == ["FROM:"]


async def test_skipped_reply_and_reply_then_close(smtp_sink: SmtpSink, link: Link) -> None:
    reader, writer = link
    smtp_sink.behaviour.script["mail"] = [SKIP]
    smtp_sink.behaviour.script["rcpt"] = ["421 4.3.2 closing" + CLOSE]
    writer.write(b"MAIL FROM:<a@test.example>\r\nRCPT TO:<b@example.com>\r\n")
    assert await _reply(reader) == (421, b"4.3.2 closing")  # MAIL taken, never answered
    assert await asyncio.wait_for(reader.read(), 5) == b""  # then the server hung up
