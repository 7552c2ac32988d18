"""Report intake: the daemon's report listener (no relay, bounded, 250 only once committed,
451 when PostgreSQL is down, STARTTLS when configured) and ``maildaemon bounces ingest``
on stdin (sysexits for the MTA)."""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest
import trustme
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from maildaemon.config import Settings
from maildaemon.config_values import split_host_port
from maildaemon.devstack.late_reports import LateReporter
from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.pipeline.report_listener import ReportListener
from maildaemon.returnpath import ReturnPath
from maildaemon.store.pipeline.db import Store
from maildaemon.telemetry import Telemetry
from tests import reports_corpus as corpus
from tests.conftest import pick_free_port
from tests.support import Db, TcpProxy, command, running_app, wait_for, xadd

MakeSettings = Callable[..., Settings]
SECRET = "s3cret-for-the-bounce-tests"
DOMAIN = "bounces.test.example"
RP = ReturnPath(DOMAIN, SECRET)
BOB = "bob@example.com"
REPO = Path(__file__).resolve().parents[2]
MAILDAEMON = str(Path(sys.executable).with_name("maildaemon"))


def bounce_settings(make_settings: MakeSettings, **more: Any) -> Settings:
    return make_settings(
        bounce_domain=DOMAIN,
        bounce_secret=SECRET,
        bounce_listen_addr=f"127.0.0.1:{pick_free_port()}",
        **more,
    )


def refusals(reader: InMemoryMetricReader) -> dict[str, int]:
    data = reader.get_metrics_data()
    out: dict[str, int] = {}
    for rm in data.resource_metrics if data else ():
        for scope in rm.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "mail.reports.refused":
                    for p in metric.data.data_points:
                        out[str(p.attributes.get("reason"))] = int(p.value)
    return out


async def send_report(settings: Settings, raw: bytes, rcpt: str, **kw: Any) -> aiosmtplib.SMTP:
    host, port = split_host_port(settings.bounce_listen_addr or "", 25)
    client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, **kw)
    await client.connect()
    await client.sendmail("", [rcpt], raw)
    return client


async def sent(settings: Settings, sink: SmtpSink, delivery_id: str) -> bytes:
    db = Db(settings.dsn)
    await xadd(settings, command(delivery_id, to=[{"address": BOB}]))
    await db.wait_status(delivery_id, "sent")
    return next(m.data for m in sink.messages if m.mail_from == RP.sender(delivery_id))


async def test_the_listener_takes_a_dsn_and_the_delivery_ends_bounced(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = bounce_settings(make_settings)
    db = Db(settings.dsn)
    async with running_app(settings) as app:
        original = await sent(settings, smtp_sink, "li-1")
        raw = corpus.dsn(original, [(BOB, "failed", "5.1.1", "550 5.1.1 unknown")])
        client = await send_report(settings, raw, RP.sender("li-1"))
        await client.quit()
        assert await db.status("li-1") == "bounced"  # committed before the 250
        row = (await db.fetch("SELECT * FROM mail.reports"))[0]
        assert (row["via"], row["kind"], row["match_status"]) == ("listener", "bounce", "matched")
        assert bytes(row["raw"]).replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")
        assert row["envelope_to"] == RP.sender("li-1")
        # The delivery's timeline in the API shows the report and what it did.
        assert app.http_port is not None
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{app.http_port}/api/v1/internal/deliveries/li-1"
            async with http.get(url) as resp:
                detail = await resp.json()
            base = f"http://127.0.0.1:{app.http_port}/api/v1/internal/reports"
            async with http.get(base, params={"match_status": "matched"}) as resp:
                page = await resp.json()
            async with http.get(f"{base}/{page['items'][0]['report_id']}/raw") as resp:
                assert resp.content_type == "message/rfc822"
                downloaded = await resp.read()
            async with http.get(base, params={"kind": "forged"}) as resp:
                assert resp.status == 400
            async with http.get(f"{base}/999999/raw") as resp:
                assert resp.status == 404
        assert [r["delivery_id"] for r in page["items"]] == ["li-1"]
        assert downloaded == bytes(row["raw"])
        assert detail["status"] == "bounced"
        (report,) = detail["reports"]
        assert (report["kind"], report["match_status"], report["via"]) == (
            "bounce",
            "matched",
            "listener",
        )
        assert report["recipients"][0]["status"] == "5.1.1"
        assert report["recipients"][0]["effect"] == "bounced and suppressed"
        (late,) = detail["late_outcomes"]
        assert (late["address"], late["outcome"], late["status_code"]) == (BOB, "bounced", "5.1.1")


async def test_the_listener_is_no_open_relay_and_bounds_size_and_connections(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = bounce_settings(make_settings, bounce_max_bytes=8192, bounce_max_connections=2)
    db = Db(settings.dsn)
    host, port = split_host_port(settings.bounce_listen_addr or "", 25)
    async with running_app(settings):
        client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False)
        await client.connect()
        await client.ehlo()
        await client.mail("spammer@example.org")
        for rcpt in ("victim@example.com", f"bounces@{DOMAIN}.evil.example", f"x@{DOMAIN}"):
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
                await client.rcpt(rcpt)
            assert refused.value.code == 550
        await client.rset()
        with pytest.raises(aiosmtplib.SMTPResponseException) as big:
            await client.sendmail("", [f"bounces@{DOMAIN}"], b"Subject: x\r\n\r\n" + b"a" * 20000)
        assert big.value.code == 552
        # Two connections are the bound: a third is told 421 and closed.
        second = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False)
        await second.connect()
        reader, writer = await asyncio.open_connection(host, port)
        assert (await reader.readline()).startswith(b"421 ")
        writer.close()
        await second.quit()
        await client.quit()
    assert await db.fetchval("SELECT count(*) FROM mail.reports") == 0


async def test_the_listener_bounds_recipients_refusals_and_session_length(
    make_settings: MakeSettings,
) -> None:
    """A hundred recipients per transaction (more: 452); ten refused recipients per session
    (the eleventh: 421 and closed, so a relay probe cannot flood the log); a session that
    keeps itself alive with NOOPs is closed after ten idle timeouts (421)."""
    settings = bounce_settings(make_settings, bounce_session_timeout="0.5s")
    host, port = split_host_port(settings.bounce_listen_addr or "", 25)
    async with running_app(settings):
        client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
        await client.connect()
        await client.ehlo()
        await client.mail("")
        for n in range(100):
            await client.rcpt(f"bounces+x{n}@{DOMAIN}")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as many:
            await client.rcpt(f"bounces+x100@{DOMAIN}")
        assert many.value.code == 452
        client.close()

        probe = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
        await probe.connect()
        await probe.ehlo()
        await probe.mail("spammer@example.org")
        codes = []
        for n in range(11):
            try:
                await probe.rcpt(f"victim{n}@example.com")
            except aiosmtplib.SMTPRecipientRefused as exc:
                codes.append(exc.code)
        assert codes == [550] * 10 + [421]
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            for _ in range(20):
                await probe.noop()
                await asyncio.sleep(0.05)

        reader, writer = await asyncio.open_connection(host, port)
        assert (await reader.readline()).startswith(b"220 ")
        started = asyncio.get_running_loop().time()
        last = b""
        while True:
            try:
                writer.write(b"NOOP\r\n")  # always well before the 0.5 s idle timeout
                line = await asyncio.wait_for(reader.readline(), 10)
            except ConnectionError:  # closed by the server while a NOOP was on its way
                break
            if not line:
                break
            last = line
            await asyncio.sleep(0.1)
        lasted = asyncio.get_running_loop().time() - started
        writer.close()
    assert last.startswith(b"421 4.4.2"), last
    assert 4.9 <= lasted <= 8.0, lasted


async def test_the_listener_answers_451_while_postgres_is_down(
    make_settings: MakeSettings, pg_dsn: str
) -> None:
    host, pg_port = split_host_port(pg_dsn.split("@")[1].split("/")[0], 5432)
    proxy = TcpProxy(host, pg_port)
    await proxy.start()
    dsn = pg_dsn.replace(f"{host}:{pg_port}", f"127.0.0.1:{proxy.port}")
    settings = bounce_settings(make_settings, postgres_primary_dsn=dsn)
    reader = InMemoryMetricReader()
    store = await Store.open(settings.dsn, min_size=1, max_size=2)
    listener = ReportListener(settings, store, Telemetry(readers=[reader]).instruments)
    task = asyncio.create_task(listener.run())
    try:
        await listener.listening.wait()
        await proxy.cut()  # PostgreSQL goes away with the report in flight
        raw = corpus.dsn(b"Subject: x\r\n\r\n", [(BOB, "failed", "5.1.1", "550 5.1.1 x")])
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await send_report(settings, raw, RP.sender("nobody"), timeout=30)
        assert exc.value.code == 451
        assert refusals(reader).get("store_unavailable") == 1
        await proxy.start(proxy.port)  # back: the sender's retry is taken
        client = await wait_for(lambda: _retry(settings, raw), timeout=30)
        await client.quit()
        assert await Db(pg_dsn).fetchval("SELECT count(*) FROM mail.reports") == 1
    finally:
        listener.stop()
        await task
        await store.close()
        await proxy.cut()


async def _retry(settings: Settings, raw: bytes) -> aiosmtplib.SMTP | None:
    try:
        return await send_report(settings, raw, RP.sender("nobody"))
    except aiosmtplib.SMTPDataError:
        return None


async def test_the_listener_offers_starttls_when_configured(
    make_settings: MakeSettings, smtp_sink: SmtpSink, tmp_path: Path, smtp_ca: trustme.CA
) -> None:
    cert = smtp_ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "chain.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    settings = bounce_settings(
        make_settings,
        bounce_tls_cert_file=tmp_path / "chain.pem",
        bounce_tls_key_file=tmp_path / "key.pem",
    )
    context = ssl.create_default_context()
    smtp_ca.configure_trust(context)
    host, port = split_host_port(settings.bounce_listen_addr or "", 25)
    async with running_app(settings):
        client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, tls_context=context)
        await client.connect()
        await client.ehlo()
        assert client.supports_extension("starttls")
        await client.starttls()
        await client.sendmail("", [f"bounces@{DOMAIN}"], corpus.auto_reply("x", "y@z"))
        await client.quit()
    row = (await Db(settings.dsn).fetch("SELECT kind, match_status FROM mail.reports"))[0]
    assert (row["kind"], row["match_status"]) == ("auto_reply", "unmatched")


async def _ingest(env: dict[str, str], raw: bytes, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        MAILDAEMON,
        "bounces",
        "ingest",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd="/",
    )
    out, err = await proc.communicate(raw)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def cli_env(settings: Settings, dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
    env.update(
        MAIL_POSTGRES_PRIMARY_DSN=dsn,
        MAIL_SMTP_MODE="stub",
        MAIL_BOUNCE_DOMAIN=DOMAIN,
        MAIL_BOUNCE_SECRET=SECRET,
        MAIL_TEMPLATE_DIR=str(REPO / "templates"),
    )
    return env


async def test_bounces_ingest_on_stdin_with_sysexits(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = bounce_settings(make_settings)
    db = Db(settings.dsn)
    async with running_app(settings):
        original = await sent(settings, smtp_sink, "in-1")
    env = cli_env(settings, settings.dsn)
    raw = corpus.dsn(original, [(BOB, "failed", "5.1.1", "550 5.1.1 unknown")])
    code, out, err = await _ingest(env, raw, "--recipient", RP.sender("in-1"))
    assert code == 0, err
    assert "bounce, matched, delivery in-1" in out
    assert await db.status("in-1") == "bounced"
    code, out, _ = await _ingest(env, raw, "--recipient", RP.sender("in-1"))
    assert code == 0 and "already recorded" in out
    # Garbage is recorded (unparseable), not refused: the MTA would only bounce it again.
    code, out, _ = await _ingest(env, b"\x00\x01 not mail at all")
    assert code == 0 and "unparseable" in out
    assert (await _ingest(env, b""))[0] == 65  # EX_DATAERR: nothing to record
    # PostgreSQL unreachable: EX_TEMPFAIL, so the MTA keeps the report and retries.
    down = cli_env(settings, f"postgresql://nobody@127.0.0.1:{pick_free_port()}/none")
    code, _, err = await _ingest(down, raw)
    assert code == 75, err
    # A report larger than the bound is kept cut, marked truncated.
    big = raw + b"x" * (settings.bounce_max_bytes + 10)
    code, _, err = await _ingest(env, big)
    assert code == 0, err
    rows = await db.fetch(
        "SELECT raw_size, raw_truncated, length(raw) AS kept FROM mail.reports "
        "ORDER BY report_id DESC LIMIT 1"
    )
    assert rows[0]["raw_truncated"] and rows[0]["kept"] == settings.bounce_max_bytes
    assert rows[0]["raw_size"] == len(big)
    code, out, _ = await _cli(env, "bounces", "list")
    assert code == 0 and "in-1" in out and "unparseable" in out
    code, out, _ = await _cli(env, "bounces", "rates", "--hours", "1")
    assert code == 0 and "authsession" in out and "100.00%" in out
    code, out, _ = await _cli(env, "deliveries", "show", "in-1")
    assert code == 0 and "bounced" in out and "bounced and suppressed" in out


async def _cli(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        MAILDAEMON,
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd="/",
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_dev_sink_reports_later_and_the_loop_closes(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    """`maildaemon dev`'s loop in process: the sink accepts mail to the test addresses with
    250, then reports to the listener: sent -> bounced, a delay, a complaint."""
    settings = bounce_settings(make_settings)
    host, port = split_host_port(settings.bounce_listen_addr or "", 25)
    reporter = LateReporter(host, port, after_s=0.2)
    smtp_sink.on_accept = reporter
    db = Db(settings.dsn)
    try:
        async with running_app(settings):
            await xadd(
                settings,
                command("dev-b", to=[{"address": "bounce@example.com"}]),
                command("dev-d", to=[{"address": "delay@example.com"}]),
                command("dev-c", to=[{"address": "complaint@example.com"}]),
                command("dev-ok", to=[{"address": "someone@example.com"}]),
            )
            await db.wait_status("dev-b", "bounced")

            async def outcomes() -> list[tuple[str, str]] | None:
                rows = await db.fetch("SELECT delivery_id, outcome FROM mail.late_outcomes")
                found = sorted((r["delivery_id"], r["outcome"]) for r in rows)
                return found if len(found) == 3 else None

            assert await wait_for(outcomes) == [
                ("dev-b", "bounced"),
                ("dev-c", "complained"),
                ("dev-d", "delayed"),
            ]
            assert [await db.status(d) for d in ("dev-c", "dev-d", "dev-ok")] == ["sent"] * 3
            suppressed = await db.fetch("SELECT address FROM mail.suppressions ORDER BY 1")
            assert [r["address"] for r in suppressed] == [
                "bounce@example.com",
                "complaint@example.com",
            ]
            assert reporter.sent == 3
    finally:
        await reporter.close()


async def test_a_flood_on_the_listener_neither_stops_reports_nor_slows_sending(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    """12 connections at once (the bound is 4): 8 are told 421; the 4 let in send 60
    forged reports while 30 deliveries go out. Every delivery is sent, every report is
    recorded (bad_token), and none changes anything."""
    settings = bounce_settings(make_settings, bounce_max_connections=4)
    db = Db(settings.dsn)
    host, port = split_host_port(settings.bounce_listen_addr or "", 25)
    forged = f"bounces+{'a' * 32}@{DOMAIN}"

    async def connect() -> aiosmtplib.SMTP | None:
        client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20)
        try:
            await client.connect()
        except aiosmtplib.SMTPConnectError:
            return None  # 421: beyond the bound
        return client

    async def flood(n: int, client: aiosmtplib.SMTP) -> int:
        async with client:
            for i in range(15):
                raw = corpus.dsn(
                    f"Subject: flood {n}-{i}\r\n\r\n".encode(),
                    [(BOB, "failed", "5.1.1", "550 5.1.1 x")],
                )
                await client.sendmail("", [forged], raw)
        return 15

    async with running_app(settings):
        await xadd(settings, *[command(f"fl-{i}") for i in range(30)])
        clients = await asyncio.gather(*(connect() for _ in range(12)))
        admitted = [c for c in clients if c is not None]
        assert len(admitted) == 4  # the other 8 were told 421
        taken = sum(await asyncio.gather(*(flood(n, c) for n, c in enumerate(admitted))))
        for i in range(30):
            await db.wait_status(f"fl-{i}", "sent")
    recorded = await db.fetch("SELECT match_status, count(*) FROM mail.reports GROUP BY 1")
    assert {r["match_status"]: r["count"] for r in recorded} == {"bad_token": taken}
    assert taken == 60
    assert await db.fetchval("SELECT count(*) FROM mail.late_outcomes") == 0
    assert await db.fetchval("SELECT count(*) FROM mail.suppressions") == 0
