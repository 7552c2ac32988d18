"""The pipelined SMTP transaction against real servers: the dev SMTP server (aiosmtpd,
with and without PIPELINING), the same server with CHUNKING and scripted hostile habits,
and the daemon end to end. Postfix is in test_pipelining_postfix.py."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import trustme

from maildaemon.config import Settings
from maildaemon.devstack.smtp_script import DROP, SILENCE, SKIP, multiline
from maildaemon.devstack.smtp_sink import SinkBehaviour, SmtpSink
from maildaemon.errors import (
    InsecureTransportError,
    TransientTransportError,
    TransportTimeout,
    UnknownOutcome,
)
from maildaemon.sending import pipelined
from maildaemon.sending.pipelined import PipeliningConnection
from maildaemon.sending.smtp import tls_context
from tests.support import Db, command, running_app, wait_for, xadd

MESSAGE = (
    b"From: a@test.example\r\nTo: b@example.com\r\nSubject: pipelined\r\n"
    b"Message-ID: <m1@test.example>\r\n\r\n"
    b".leading dot\r\n..two dots\r\nplain\r\n.\r\nend\r\n"
)
MakeConn = Callable[..., PipeliningConnection]


def settings_for(port: int, ca_file: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "postgres_primary_dsn": "postgresql://unused@127.0.0.1:1/unused",
        "smtp_mode": "smtp",
        "smtp_addr": f"localhost:{port}",
        "smtp_from": "noreply@test.example",
        "smtp_ca_file": ca_file,
        "smtp_timeout": 5,
    }
    values.update(overrides)
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
    with mock.patch.dict(os.environ, clean_env, clear=True):
        return Settings(_env_file=None, **values)


@pytest.fixture
def ca_file(tmp_path: Path, smtp_ca: trustme.CA) -> Path:
    path = tmp_path / "ca.pem"
    smtp_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
async def conns() -> AsyncIterator[list[PipeliningConnection]]:
    opened: list[PipeliningConnection] = []
    yield opened
    for conn in opened:
        await conn.close()


@pytest.fixture
async def scripted(smtp_ca: trustme.CA) -> AsyncIterator[SmtpSink]:
    """The server with PIPELINING and CHUNKING (tests take either away)."""
    server = SmtpSink(behaviour=SinkBehaviour(pipelining=True, chunking=True), ca=smtp_ca)
    await server.start()
    yield server
    await server.stop()


def offer(server: SmtpSink, extensions: tuple[str, ...]) -> None:
    server.behaviour.pipelining = "PIPELINING" in extensions
    server.behaviour.chunking = "CHUNKING" in extensions


@pytest.fixture
def connect(
    ca_file: Path, conns: list[PipeliningConnection]
) -> Callable[..., PipeliningConnection]:
    def make(port: int, **overrides: Any) -> PipeliningConnection:
        settings = settings_for(port, ca_file, **overrides)
        conn = PipeliningConnection(settings, tls_context(settings))
        conns.append(conn)
        return conn

    return make


# aiosmtpd ---------------------------------------------------------------------------------


@pytest.fixture
async def aiosmtpd_sink(tmp_path: Path, smtp_ca: trustme.CA) -> AsyncIterator[SmtpSink]:
    sink = SmtpSink(behaviour=SinkBehaviour(pipelining=True), ca=smtp_ca)
    await sink.start()
    yield sink
    await sink.stop()


async def test_aiosmtpd_pipelined_messages_share_one_tls_connection(
    aiosmtpd_sink: SmtpSink, connect: MakeConn
) -> None:
    conn = connect(aiosmtpd_sink.port)
    for i in range(3):
        report = await conn.send("noreply@test.example", [f"user{i}@example.com"], MESSAGE)
        assert report.data_reply is not None and report.data_reply.code == 250
        assert conn.pipelining
    assert aiosmtpd_sink.connections_opened == 1
    assert [m.rcpt_tos for m in aiosmtpd_sink.messages] == [
        [f"user{i}@example.com"] for i in range(3)
    ]
    assert all(m.tls for m in aiosmtpd_sink.messages)
    assert aiosmtpd_sink.messages[0].data == MESSAGE  # dots intact


async def test_aiosmtpd_partial_refusal_reports_each_recipient(
    aiosmtpd_sink: SmtpSink, connect: MakeConn
) -> None:
    aiosmtpd_sink.behaviour.rcpt_replies = {
        "gone@example.com": ["550 5.1.1 no such user"],
        "later@example.com": ["451 4.3.0 try later"],
    }
    conn = connect(aiosmtpd_sink.port)
    rcpts = ["ok@example.com", "gone@example.com", "later@example.com"]
    report = await conn.send("noreply@test.example", rcpts, MESSAGE)
    assert list(report.accepted) == ["ok@example.com"]
    assert report.refused["gone@example.com"].code == 550
    assert report.deferred["later@example.com"].code == 451
    assert report.data_reply is not None
    assert [m.rcpt_tos for m in aiosmtpd_sink.messages] == [["ok@example.com"]]


async def test_aiosmtpd_all_refused_sends_no_data_and_the_connection_goes_on(
    aiosmtpd_sink: SmtpSink, connect: MakeConn
) -> None:
    aiosmtpd_sink.behaviour.rcpt_replies = {"gone@example.com": ["550 5.1.1 no such user"]}
    conn = connect(aiosmtpd_sink.port)
    report = await conn.send("noreply@test.example", ["gone@example.com"], MESSAGE)
    assert report.accepted == {} and report.refused["gone@example.com"].code == 550
    assert report.data_reply is None
    assert aiosmtpd_sink.messages == [] and aiosmtpd_sink.rejected == []
    report = await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)
    assert report.data_reply is not None
    assert len(aiosmtpd_sink.messages) == 1 and aiosmtpd_sink.connections_opened == 1


async def test_aiosmtpd_data_refused_is_reported(
    aiosmtpd_sink: SmtpSink, connect: MakeConn
) -> None:
    aiosmtpd_sink.behaviour.script["end of data"] = ["554 5.7.1 spam"]
    conn = connect(aiosmtpd_sink.port)
    report = await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)
    assert report.data_reply is None
    assert report.data_refused is not None and report.data_refused.code == 554
    assert (await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)).data_reply


async def test_aiosmtpd_without_pipelining_one_command_at_a_time(
    aiosmtpd_sink: SmtpSink, connect: MakeConn
) -> None:
    aiosmtpd_sink.behaviour.pipelining = False
    conn = connect(aiosmtpd_sink.port)
    report = await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)
    assert report.data_reply is not None and not conn.pipelining
    assert len(aiosmtpd_sink.messages) == 1


async def test_setting_off_never_pipelines(aiosmtpd_sink: SmtpSink, connect: MakeConn) -> None:
    conn = connect(aiosmtpd_sink.port, smtp_pipelining="off")
    report = await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)
    assert report.data_reply is not None and not conn.pipelining


async def test_aiosmtpd_stale_kept_open_connection_reconnects(
    aiosmtpd_sink: SmtpSink, connect: MakeConn
) -> None:
    aiosmtpd_sink.behaviour.close_after_messages = 1
    conn = connect(aiosmtpd_sink.port)
    for _ in range(3):
        assert (await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)).data_reply
        await asyncio.sleep(0.05)  # the server's close arrives
    assert len(aiosmtpd_sink.messages) == 3 and aiosmtpd_sink.connections_opened == 3


async def test_aiosmtpd_drop_after_data_is_unknown(
    aiosmtpd_sink: SmtpSink, connect: MakeConn
) -> None:
    aiosmtpd_sink.behaviour.script["end of data"] = [DROP]
    conn = connect(aiosmtpd_sink.port)
    with pytest.raises(UnknownOutcome):
        await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)
    assert len(aiosmtpd_sink.dropped) == 1
    assert (await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)).data_reply


async def test_aiosmtpd_auth_then_pipelined(aiosmtpd_sink: SmtpSink, connect: MakeConn) -> None:
    aiosmtpd_sink.behaviour.auth = ("bench", "s3cret")
    conn = connect(aiosmtpd_sink.port, smtp_username="bench", smtp_password="s3cret")
    assert (await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)).data_reply
    assert conn.pipelining and len(aiosmtpd_sink.messages) == 1
    wrong = connect(aiosmtpd_sink.port, smtp_username="bench", smtp_password="wrong")
    with pytest.raises(TransientTransportError, match="authentication"):
        await wrong.send("noreply@test.example", ["ok@example.com"], MESSAGE)
    assert len(aiosmtpd_sink.messages) == 1


async def test_no_starttls_nothing_in_clear(aiosmtpd_sink: SmtpSink, connect: MakeConn) -> None:
    aiosmtpd_sink.behaviour.offer_starttls = False
    conn = connect(aiosmtpd_sink.port)
    with pytest.raises(InsecureTransportError):
        await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)
    assert aiosmtpd_sink.messages == []


async def test_untrusted_certificate_nothing_sent(
    aiosmtpd_sink: SmtpSink, connect: MakeConn, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    conn = connect(aiosmtpd_sink.port, smtp_ca_file=other)
    with pytest.raises(InsecureTransportError):
        await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)
    assert aiosmtpd_sink.messages == []


# scripted server: CHUNKING and hostile habits ---------------------------------------------


async def _flights_per_message(server: SmtpSink, conn: PipeliningConnection) -> float:
    await conn.send("noreply@test.example", ["warm@example.com"], MESSAGE)  # connects
    before = server.flights
    for i in range(5):
        report = await conn.send(
            "noreply@test.example", [f"a{i}@example.com", "b@x.example"], MESSAGE
        )
        assert report.data_reply is not None
    return (server.flights - before) / 5


async def test_chunking_one_round_trip_per_message(scripted: SmtpSink, connect: MakeConn) -> None:
    conn = connect(scripted.port)
    assert await _flights_per_message(scripted, conn) == 1
    assert scripted.connections_opened == 1
    assert all(m.data == MESSAGE for m in scripted.messages)  # BDAT: bytes as they are
    assert scripted.transaction_verbs()[-4:] == ["MAIL", "RCPT", "RCPT", "BDAT"]


async def test_pipelining_without_chunking_two_round_trips(
    scripted: SmtpSink, connect: MakeConn
) -> None:
    offer(scripted, ("PIPELINING",))
    conn = connect(scripted.port)
    assert await _flights_per_message(scripted, conn) == 2
    assert all(m.data == MESSAGE for m in scripted.messages)  # dot-stuffed and unstuffed


async def test_no_extension_four_round_trips(scripted: SmtpSink, connect: MakeConn) -> None:
    offer(scripted, ())
    conn = connect(scripted.port)
    assert await _flights_per_message(scripted, conn) == 5  # MAIL, RCPT, RCPT, DATA, data
    assert not conn.pipelining


@pytest.mark.parametrize("extensions", [("PIPELINING", "CHUNKING"), ("PIPELINING",)])
async def test_multiline_replies_split_across_segments(
    scripted: SmtpSink, connect: MakeConn, extensions: tuple[str, ...]
) -> None:
    offer(scripted, extensions)
    two = ("first line", "second line")
    scripted.behaviour.split_writes = True
    scripted.behaviour.script["mail"] = [multiline("250 2.1.0 sender ok", *two)]
    scripted.behaviour.rcpt_replies = {
        "ok@example.com": [multiline("250 2.1.5 recipient ok", *two)],
        "gone@example.com": [multiline("550 5.1.1 no such user", *two)],
    }
    scripted.behaviour.script["end of data"] = [multiline("250 2.0.0 queued", *two)]
    conn = connect(scripted.port)
    report = await conn.send(
        "noreply@test.example", ["ok@example.com", "gone@example.com"], MESSAGE
    )
    assert report.accepted["ok@example.com"].text == ("first line\nsecond line\n2.1.5 recipient ok")
    assert report.refused["gone@example.com"].text.endswith("5.1.1 no such user")
    assert report.data_reply is not None
    assert report.data_reply.text == "first line\nsecond line\n2.0.0 queued"
    assert [m.rcpt_tos for m in scripted.messages] == [["ok@example.com"]]


@pytest.mark.parametrize("extensions", [("PIPELINING", "CHUNKING"), ("PIPELINING",)])
async def test_all_refused_then_next_message_after_rset(
    scripted: SmtpSink, connect: MakeConn, extensions: tuple[str, ...]
) -> None:
    offer(scripted, extensions)
    scripted.behaviour.rcpt_replies = {"gone@example.com": ["550 5.1.1 no such user"]}
    conn = connect(scripted.port)
    report = await conn.send("noreply@test.example", ["gone@example.com"], MESSAGE)
    assert report.accepted == {} and report.data_reply is None
    assert scripted.messages == []
    first = scripted.transaction_verbs()
    if "CHUNKING" not in extensions:
        assert first == ["MAIL", "RCPT", "DATA"]  # pipelined, answered 554; no data after it
    report = await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)
    assert report.data_reply is not None and len(scripted.messages) == 1
    assert scripted.transaction_verbs()[len(first)] == "RSET"
    assert scripted.connections_opened == 1


async def test_data_mode_all_refused_sends_no_message_bytes(
    scripted: SmtpSink, connect: MakeConn
) -> None:
    offer(scripted, ("PIPELINING",))
    scripted.behaviour.rcpt_replies = {"gone@example.com": ["550 5.1.1 no such user"]}
    conn = connect(scripted.port)
    await conn.send("noreply@test.example", ["gone@example.com"], MESSAGE)
    # Every line the server got after TLS is a command: the message never went out.
    assert scripted.transaction_verbs() == ["MAIL", "RCPT", "DATA"]


@pytest.mark.parametrize("extensions", [("PIPELINING", "CHUNKING"), ("PIPELINING",)])
async def test_drop_after_end_of_data_is_unknown(
    scripted: SmtpSink, connect: MakeConn, extensions: tuple[str, ...]
) -> None:
    offer(scripted, extensions)
    scripted.behaviour.script["end of data"] = [DROP]
    conn = connect(scripted.port)
    with pytest.raises(UnknownOutcome):
        await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)
    assert len(scripted.dropped) == 1


@pytest.mark.parametrize(
    ("extensions", "expected"),
    [(("PIPELINING", "CHUNKING"), UnknownOutcome), (("PIPELINING",), TransportTimeout)],
)
async def test_silent_server_past_timeout(
    scripted: SmtpSink,
    connect: MakeConn,
    extensions: tuple[str, ...],
    expected: type[Exception],
) -> None:
    """With BDAT the message is in the first write: silence is "unknown"; with DATA the
    message never left, so it is a plain timeout."""
    offer(scripted, extensions)
    scripted.behaviour.script["mail"] = [SILENCE]
    conn = connect(scripted.port, smtp_timeout=0.5)
    with pytest.raises(expected):
        await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)
    assert scripted.messages == []


@pytest.mark.parametrize(
    ("extensions", "expected"),
    [(("PIPELINING", "CHUNKING"), UnknownOutcome), (("PIPELINING",), TransportTimeout)],
)
async def test_fewer_replies_than_commands(
    scripted: SmtpSink,
    connect: MakeConn,
    extensions: tuple[str, ...],
    expected: type[Exception],
) -> None:
    offer(scripted, extensions)
    scripted.behaviour.script["rcpt"] = [SKIP]
    conn = connect(scripted.port, smtp_timeout=0.5)
    with pytest.raises(expected):
        await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)
    if "CHUNKING" not in extensions:
        assert scripted.messages == []  # the replies never lined up: no data went out


@pytest.mark.parametrize(
    ("extensions", "after", "expected"),
    [
        (("PIPELINING", "CHUNKING"), "mail", UnknownOutcome),
        (("PIPELINING", "CHUNKING"), "end of data", UnknownOutcome),
        (("PIPELINING",), "mail", TransientTransportError),
        (("PIPELINING",), "end of data", UnknownOutcome),
    ],
)
async def test_more_replies_than_commands_is_never_taken_as_success(
    scripted: SmtpSink,
    connect: MakeConn,
    extensions: tuple[str, ...],
    after: str,
    expected: type[Exception],
) -> None:
    offer(scripted, extensions)
    reply = "250 2.1.0 sender ok" if after == "mail" else "250 2.0.0 queued"
    scripted.behaviour.script[after] = [f"{reply}\r\n250 2.0.0 unrequested"]  # one too many
    conn = connect(scripted.port)
    with pytest.raises(expected) as info:
        await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)
    assert not isinstance(info.value, UnknownOutcome) or expected is UnknownOutcome
    if expected is not UnknownOutcome:
        assert scripted.messages == []  # out of step before any data: nothing sent
    assert not conn.pipelining  # the connection was dropped


@pytest.mark.parametrize("reply", ["421 4.4.2 idle timeout", None])
@pytest.mark.parametrize("extensions", [("PIPELINING", "CHUNKING"), ("PIPELINING",)])
async def test_server_closes_idle_connection_then_reconnect(
    scripted: SmtpSink,
    connect: MakeConn,
    extensions: tuple[str, ...],
    reply: str | None,
) -> None:
    offer(scripted, extensions)
    conn = connect(scripted.port)
    assert (await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)).data_reply
    scripted.close_connections(reply)
    await asyncio.sleep(0.05)
    assert (await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)).data_reply
    assert len(scripted.messages) == 2 and scripted.connections_opened == 2


async def test_idle_connection_is_probed_before_a_bdat_flight(
    scripted: SmtpSink, connect: MakeConn, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = connect(scripted.port)
    assert (await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)).data_reply
    monkeypatch.setattr(pipelined, "IDLE_PROBE_S", 0.0)
    assert (await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)).data_reply
    assert scripted.transaction_verbs()[-4:] == ["NOOP", "MAIL", "RCPT", "BDAT"]


async def test_bdat_refused_message_is_reported(scripted: SmtpSink, connect: MakeConn) -> None:
    scripted.behaviour.script["end of data"] = ["554 5.7.1 rejected as spam"]
    conn = connect(scripted.port)
    report = await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)
    assert report.data_reply is None
    assert report.data_refused is not None and report.data_refused.code == 554
    assert "ok@example.com" in report.accepted  # the envelope was fine; outcomes decides


def test_tls_context_verifies(ca_file: Path) -> None:
    ctx = tls_context(settings_for(25, ca_file))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


# the daemon end to end over the scripted CHUNKING server ----------------------------------


MakeSettings = Callable[..., Settings]


async def test_daemon_bdat_one_flight_per_message_and_recorded_sent(
    make_settings: MakeSettings, scripted: SmtpSink
) -> None:
    settings = make_settings(smtp_addr=f"localhost:{scripted.port}")
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, *(command(f"b-{i}", idempotency_key=f"b-{i}") for i in range(5)))
        for i in range(5):
            await db.wait_status(f"b-{i}", "sent")
    assert len(scripted.messages) == 5
    assert scripted.transaction_verbs().count("BDAT") == 5
    assert "DATA" not in scripted.transaction_verbs()
    attempts = [a for i in range(5) for a in await db.attempts(f"b-{i}")]
    assert [(a["status"], a["reply_code"]) for a in attempts] == [("sent", 250)] * 5


@pytest.mark.parametrize(
    ("extensions", "attempt_status"),
    [(("PIPELINING", "CHUNKING"), "unknown"), (("PIPELINING",), "timed_out")],
)
async def test_daemon_silent_server_timeout_is_unknown_only_once_data_is_out(
    make_settings: MakeSettings,
    scripted: SmtpSink,
    extensions: tuple[str, ...],
    attempt_status: str,
) -> None:
    """The worker's own MAIL_SMTP_TIMEOUT fires: with BDAT the message was in the first
    write, so the attempt is `unknown` (retried as a possible duplicate); with DATA it
    never left, so it is `timed_out`."""
    offer(scripted, extensions)
    scripted.behaviour.script["mail"] = [SILENCE]
    settings = make_settings(
        smtp_addr=f"localhost:{scripted.port}", smtp_timeout=1, retry_ladder="30s"
    )
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("d-silent"))

        async def finished() -> list[Any]:
            # The claim opens the attempt as `started`; wait for its outcome.
            return [a for a in await db.attempts("d-silent") if a["status"] != "started"]

        await wait_for(finished, timeout=15)
    (attempt,) = await db.attempts("d-silent")
    assert attempt["status"] == attempt_status
    row = (await db.fetch("SELECT * FROM mail.deliveries WHERE delivery_id = 'd-silent'"))[0]
    assert row["status"] == "queued"  # retry scheduled
    assert row["possible_duplicate"] is (attempt_status == "unknown")
