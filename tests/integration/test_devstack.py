"""The embedded stack: PostgreSQL, Redis, the SMTP sink, and the whole dev stack."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from unittest import mock

import aiosmtplib
import asyncpg
import pytest
import redis.asyncio as aioredis

from maildaemon.config import Settings
from maildaemon.config_values import split_host_port
from maildaemon.devstack.postgres import EmbeddedPostgres
from maildaemon.devstack.redis import EmbeddedRedis
from maildaemon.devstack.smtp_script import DROP
from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.devstack.stack import DevStack, choose_port
from maildaemon.errors import StartupError

REPO = Path(__file__).resolve().parents[2]
MESSAGE = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: hello\r\n\r\nHello there.\r\n"


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _client(sink: SmtpSink, **kwargs: object) -> aiosmtplib.SMTP:
    options: dict[str, object] = {"start_tls": True, "cert_bundle": str(sink.ca_file)}
    options.update(kwargs)
    return aiosmtplib.SMTP(hostname=sink.host, port=sink.port, timeout=5, **options)  # type: ignore[arg-type]


@pytest.fixture
async def tls_client(smtp_sink: SmtpSink) -> AsyncIterator[aiosmtplib.SMTP]:
    client = _client(smtp_sink)
    await client.connect()
    try:
        yield client
    finally:
        if client.is_connected:
            client.close()


# PostgreSQL --------------------------------------------------------------------------


async def test_postgres_answers_sql_and_keeps_its_data(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg", fast=True)
    try:
        dsn = server.start()
        assert dsn == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT 6 * 7") == 42
            assert await conn.fetchval("SHOW fsync") == "off"
            assert await conn.fetchval("SHOW max_connections") == "200"
            assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
            await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('yes')")
        finally:
            await conn.close()
        postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
        if os.geteuid() == 0:  # PostgreSQL refuses root: it runs unprivileged
            assert os.stat(f"/proc/{postmaster}").st_uid != 0
        server.stop()
        server.stop()  # idempotent
        assert _gone(postmaster)
        assert not _listening(server.port)

        with EmbeddedPostgres(tmp_path / "pg", fast=True) as again:  # the data dir is reused
            conn = await asyncpg.connect(again.dsn)
            try:
                assert await conn.fetchval("SELECT v FROM kept") == "yes"
            finally:
                await conn.close()
    finally:
        server.stop()
        if server.data_dir != tmp_path / "pg":
            shutil.rmtree(server.data_dir, ignore_errors=True)


def test_postgres_start_failure_reports_the_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = EmbeddedPostgres(tmp_path / "pg", port=taken.getsockname()[1], fast=True)
        try:
            with pytest.raises(StartupError, match=r"could not bind|Address already in use"):
                server.start()
            assert not server.running
        finally:
            server.stop()
            if server.data_dir != tmp_path / "pg":
                shutil.rmtree(server.data_dir, ignore_errors=True)


# Redis ---------------------------------------------------------------------------------


async def test_redis_serves_streams(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis") as server:
        host, port = split_host_port(server.addr, 6379)
        assert host == "127.0.0.1"
        client = aioredis.Redis(host=host, port=port)
        try:
            await client.xgroup_create("s", "g", id="0", mkstream=True)
            entry = await client.xadd("s", {"k": "v"})
            got = await client.xreadgroup("g", "c", {"s": ">"}, count=10, block=100)
            assert got == [[b"s", [(entry, {b"k": b"v"})]]]
            assert await client.xack("s", "g", entry) == 1
            assert await client.config_get("save") == {"save": ""}
        finally:
            await client.aclose()
        pid = server.pid
    assert pid is not None and _gone(pid)


async def test_persistent_redis_keeps_data_across_restarts(tmp_path: Path) -> None:
    for expected in (None, b"kept"):
        with EmbeddedRedis(tmp_path / "redis", persistent=True) as server:
            client = aioredis.Redis(host="127.0.0.1", port=server.port)
            try:
                assert await client.get("k") == expected
                await client.set("k", "kept")
            finally:
                await client.aclose()


# SMTP sink -----------------------------------------------------------------------------


async def test_sink_delivers_over_verified_starttls(
    smtp_sink: SmtpSink, tls_client: aiosmtplib.SMTP, tmp_path: Path
) -> None:
    errors, _ = await tls_client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
    assert errors == {}

    [message] = await smtp_sink.wait_for(1, timeout=5)
    assert message.tls is True
    assert (message.mail_from, message.rcpt_tos) == ("a@example.test", ["b@example.test"])
    assert message.data == MESSAGE
    assert message.parse()["Subject"] == "hello"
    [eml] = (tmp_path / "sink-maildir").glob("*.eml")
    assert eml.read_bytes() == MESSAGE


async def test_sink_certificate_is_not_trusted_without_its_ca(smtp_sink: SmtpSink) -> None:
    client = _client(smtp_sink, cert_bundle=None, tls_context=ssl.create_default_context())
    with pytest.raises(ssl.SSLCertVerificationError):
        await client.connect()
    client.close()


async def test_sink_requires_starttls_before_mail(smtp_sink: SmtpSink) -> None:
    client = _client(smtp_sink, start_tls=False)
    await client.connect()
    try:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.mail("a@example.test")
        assert refused.value.code == 530
        assert refused.value.message == "5.7.0 Must issue a STARTTLS command first"
    finally:
        client.close()


async def test_sink_can_hide_starttls(smtp_sink: SmtpSink) -> None:
    smtp_sink.behaviour.offer_starttls = False
    client = _client(smtp_sink, start_tls=False)
    await client.connect()
    try:
        await client.ehlo()
        assert not client.supports_extension("starttls")
        await client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
    finally:
        client.close()
    [message] = smtp_sink.messages
    assert message.tls is False


async def test_sink_scripted_rcpt_replies(smtp_sink: SmtpSink, tls_client: aiosmtplib.SMTP) -> None:
    smtp_sink.behaviour.rcpt_replies = {
        "soft@example.test": ["451 4.3.0 try later"],
        "hard@example.test": ["550 5.1.1 unknown user"],
    }
    rcpts = ["soft@example.test", "hard@example.test", "ok@example.test"]
    errors, _ = await tls_client.sendmail("a@example.test", rcpts, MESSAGE)
    assert {k: (v.code, v.message) for k, v in errors.items()} == {
        "soft@example.test": (451, "4.3.0 try later"),
        "hard@example.test": (550, "5.1.1 unknown user"),
    }
    errors, _ = await tls_client.sendmail("a@example.test", ["soft@example.test"], MESSAGE)
    assert errors == {}  # the scripted reply was used up
    assert [m.rcpt_tos for m in smtp_sink.messages] == [["ok@example.test"], ["soft@example.test"]]


async def test_sink_scripted_data_replies(smtp_sink: SmtpSink, tls_client: aiosmtplib.SMTP) -> None:
    smtp_sink.behaviour.script["end of data"] = ["451 4.3.0 queue full", "554 5.6.0 rejected"]
    for code in (451, 554):
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await tls_client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        assert refused.value.code == code
    _, reply = await tls_client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
    assert reply == "2.0.0 OK queued"
    assert len(smtp_sink.messages) == 1
    assert len(smtp_sink.rejected) == 2


async def test_sink_drops_the_link_after_data(smtp_sink: SmtpSink) -> None:
    smtp_sink.behaviour.script["end of data"] = [DROP]
    client = _client(smtp_sink)
    await client.connect()
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
    client.close()
    assert [m.data for m in smtp_sink.dropped] == [MESSAGE]  # fully received, never answered
    assert smtp_sink.messages == []

    client = _client(smtp_sink)
    await client.connect()
    try:
        await client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
    finally:
        client.close()
    assert len(smtp_sink.messages) == 1


async def test_sink_closes_after_n_messages(
    smtp_sink: SmtpSink, tls_client: aiosmtplib.SMTP
) -> None:
    smtp_sink.behaviour.close_after_messages = 2
    for _ in range(2):
        await tls_client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await tls_client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
    assert len(smtp_sink.messages) == 2
    assert smtp_sink.connections_opened == 1


async def test_sink_requires_auth_when_configured(smtp_sink: SmtpSink) -> None:
    smtp_sink.behaviour.auth = ("user", "secret")
    client = _client(smtp_sink)
    await client.connect()
    try:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.mail("a@example.test")
        assert refused.value.code == 530
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await client.login("user", "wrong")
        await client.login("user", "secret")
        await client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
    finally:
        client.close()
    assert len(smtp_sink.messages) == 1


async def test_sink_wait_for_times_out(smtp_sink: SmtpSink) -> None:
    with pytest.raises(TimeoutError, match="accepted 0 of 1"):
        await smtp_sink.wait_for(1, timeout=0.1)


# The shared fixtures -------------------------------------------------------------------


async def test_each_test_gets_a_fresh_migrated_database(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert (await conn.fetchval("SELECT current_database()")).startswith("t_")
        assert await conn.fetchval("SELECT count(*) FROM mail.deliveries") == 0
    finally:
        await conn.close()


async def test_make_settings_points_at_the_fixtures(
    make_settings: Callable[..., Settings], smtp_sink: SmtpSink, redis_addr: str
) -> None:
    with mock.patch.dict(os.environ, {"MAIL_SMTP_USERNAME": "leaked"}):
        settings = make_settings(retry_ladder="5s")
    assert settings.smtp_host_port == (smtp_sink.host, smtp_sink.port)
    assert settings.smtp_ca_file == smtp_sink.ca_file
    assert settings.smtp_username is None  # the environment does not leak in
    assert settings.retry_ladder == (5.0,)
    assert settings.redis_master_addr == redis_addr
    client = aioredis.Redis(host=settings.redis_host_port[0], port=settings.redis_host_port[1])
    try:
        assert await client.dbsize() == 0
    finally:
        await client.aclose()
    conn = await asyncpg.connect(settings.dsn)
    await conn.close()


# The whole dev stack -------------------------------------------------------------------


def test_choose_port_prefers_the_stable_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert choose_port(port) == 0
    assert choose_port(port) == port


@pytest.mark.slow
async def test_dev_stack_starts_serves_and_stops_everything(tmp_path: Path) -> None:
    # Port 0 everywhere: the stable ports may be in use by a developer's running stack.
    stack = DevStack(tmp_path / "dev", redis_port=0, postgres_port=0, smtp_port=0, http_port=0)
    try:
        env = stack.start()
        assert stack.redis is not None and stack.postgres is not None
        pg_data = stack.postgres.data_dir
        postmaster = int((pg_data / "postmaster.pid").read_text().split()[0])
        pids = [stack.redis.pid, stack.sink_pid, postmaster]

        with mock.patch.dict(os.environ, env):
            settings = Settings(_env_file=None)
        assert settings.smtp_mode == "smtp"
        assert settings.dsn.endswith("/maildaemon")
        assert settings.template_dir == REPO / "templates"

        with pytest.raises(StartupError, match="another dev stack"):
            DevStack(tmp_path / "dev").start()

        conn = await asyncpg.connect(settings.dsn)
        try:
            assert await conn.fetchval("SELECT current_database()") == "maildaemon"
            assert await conn.fetchval("SHOW fsync") == "on"
        finally:
            await conn.close()
        host, port = settings.redis_host_port
        client = aioredis.Redis(host=host, port=port)
        try:
            assert await client.ping()
            assert await client.config_get("appendonly") == {"appendonly": "yes"}
        finally:
            await client.aclose()
        smtp_host, smtp_port = settings.smtp_host_port
        smtp = aiosmtplib.SMTP(
            hostname=smtp_host,
            port=smtp_port,
            start_tls=True,
            cert_bundle=str(settings.smtp_ca_file),
            timeout=5,
        )
        await smtp.connect()
        try:
            await smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        finally:
            smtp.close()
        [eml] = (tmp_path / "dev" / "smtp" / "maildir").glob("*.eml")
        assert eml.read_bytes() == MESSAGE

        ports = [port, smtp_port, stack.postgres.port]
    finally:
        stack.stop()
    stack.stop()  # idempotent
    try:
        assert all(pid is not None and _gone(pid) for pid in pids)
        assert not any(_listening(p) for p in ports)
    finally:
        if pg_data != tmp_path / "dev" / "postgres":
            shutil.rmtree(pg_data, ignore_errors=True)
