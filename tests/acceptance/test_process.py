"""The daemon as a user runs it: a real process, its exit codes, signals, and the dev stack."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import aiosmtplib
import psycopg
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from maildaemon.devstack.postgres import pick_free_port
from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.store.migrate import _LOCK_KEY
from tests.support import Db, command, wait_for, xadd

REPO = Path(__file__).resolve().parents[2]


def daemon_env(pg_dsn: str, redis_addr: str, sink: SmtpSink | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
    env.update(
        {
            "MAIL_POSTGRES_PRIMARY_DSN": pg_dsn,
            "MAIL_REDIS_MASTER_ADDR": redis_addr,
            "MAIL_TEMPLATE_DIR": str(REPO / "templates"),
            "MAIL_INTERNAL_HTTP_ADDR": f"127.0.0.1:{pick_free_port()}",
            "MAIL_SHUTDOWN_TIMEOUT": "5s",
            "MAIL_SCHEDULER_POLL_INTERVAL": "0.2s",
            "MAIL_CONSUMER_BLOCK": "0.2s",
            "MAIL_LOG_FORMAT": "json",
        }
    )
    if sink is not None:
        env.update(
            {
                "MAIL_SMTP_MODE": "smtp",
                "MAIL_SMTP_ADDR": f"{sink.host}:{sink.port}",
                "MAIL_SMTP_FROM": "maildaemon <noreply@test.example>",
                "MAIL_SMTP_CA_FILE": str(sink.ca_file),
            }
        )
    else:
        env["MAIL_SMTP_MODE"] = "stub"
    env.update(extra)
    return env


# The daemon logs a line per delivery outcome: its stderr is read all along (a full pipe
# would block it), and a test gets what it wrote with `stderr_of`.
_STDERR: dict[int, asyncio.Future[bytes]] = {}


async def spawn(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "maildaemon.cli.main",
        *args,
        env=env,
        cwd=str(REPO),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    _STDERR[proc.pid] = asyncio.ensure_future(proc.stderr.read())
    return proc


async def stderr_of(proc: asyncio.subprocess.Process) -> str:
    """Everything the process wrote to stderr (call once it has exited)."""
    return (await _STDERR.pop(proc.pid)).decode()


async def finish(proc: asyncio.subprocess.Process, timeout: float) -> tuple[str, str]:
    """Wait for a spawned process; (stdout, stderr). Use this, not ``communicate()``:
    spawn() already reads stderr, and a second reader of one pipe is an error."""
    assert proc.stdout is not None
    out = await asyncio.wait_for(proc.stdout.read(), timeout)
    await asyncio.wait_for(proc.wait(), timeout)
    return out.decode(errors="replace"), await stderr_of(proc)


async def _port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def _ready(port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.write(b"GET /readyz HTTP/1.0\r\n\r\n")
    data = await reader.read()
    writer.close()
    return b" 200 " in data.split(b"\r\n", 1)[0]


def _port(env: dict[str, str]) -> int:
    return int(env["MAIL_INTERNAL_HTTP_ADDR"].rsplit(":", 1)[1])


@pytest.fixture
async def stub_env(pg_dsn: str, redis_addr: str) -> AsyncIterator[dict[str, str]]:
    yield daemon_env(pg_dsn, redis_addr, None)


async def test_sigterm_while_idle_exits_zero_in_time(stub_env: dict[str, str]) -> None:
    stub_env = dict(
        stub_env,
        MAIL_SMTP_USERNAME="mailer",
        MAIL_SMTP_PASSWORD="pw-s3cret-1",
        MAIL_OPERATOR_TOKEN="tok-s3cret-2",
    )
    proc = await spawn("run", env=stub_env)
    await wait_for(lambda: _ready(_port(stub_env)), timeout=30)
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(proc.wait(), 10)
    stderr = await stderr_of(proc)
    assert code == 0, stderr
    assert "pw-s3cret-1" not in stderr and "tok-s3cret-2" not in stderr  # secrets never logged
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    order = [
        "startup: redis ping",
        "startup: postgres pool",
        "startup: migrations",
        "startup: template catalog",
        "startup: internal http listener",
        "started",
        "ready",
        "shutdown requested",
        "internal http listener stopped",
        "stopped",
    ]
    positions = [events.index(e) for e in order]
    assert positions == sorted(positions), events
    assert events.count("ready") == 1
    assert not await _port_open(_port(stub_env))


async def test_sigint_also_stops_cleanly(stub_env: dict[str, str]) -> None:
    proc = await spawn("run", env=stub_env)
    await wait_for(lambda: _ready(_port(stub_env)), timeout=30)
    proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_http_does_not_listen_before_migrations_ran(
    stub_env: dict[str, str], pg_dsn: str
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        proc = await spawn("run", env=stub_env)
        await asyncio.sleep(2.0)  # Redis and the pool are up; migrations wait for the lock
        assert proc.returncode is None
        assert not await _port_open(_port(stub_env))
        holder.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    await wait_for(lambda: _ready(_port(stub_env)), timeout=30)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_bad_dsn_exits_nonzero_with_a_readable_message(stub_env: dict[str, str]) -> None:
    env = dict(
        stub_env, MAIL_POSTGRES_PRIMARY_DSN=f"postgresql://mail@127.0.0.1:{pick_free_port()}/mail"
    )
    proc = await spawn("run", env=env)
    code = await asyncio.wait_for(proc.wait(), 30)
    stderr = await stderr_of(proc)
    assert code != 0
    assert "startup failed: postgres pool" in stderr
    assert "Traceback" not in stderr


async def test_unreachable_redis_exits_nonzero_with_a_readable_message(
    stub_env: dict[str, str],
) -> None:
    env = dict(stub_env, MAIL_REDIS_MASTER_ADDR=f"127.0.0.1:{pick_free_port()}")
    proc = await spawn("run", env=env)
    code = await asyncio.wait_for(proc.wait(), 30)
    stderr = await stderr_of(proc)
    assert code != 0
    assert "startup failed: redis ping" in stderr
    assert "Traceback" not in stderr


async def test_invalid_configuration_is_one_line(stub_env: dict[str, str]) -> None:
    env = dict(stub_env, MAIL_SMTP_MODE="smtp", MAIL_SMTP_PASSWORD="s3cret-value")
    env.pop("MAIL_SMTP_ADDR", None)
    proc = await spawn("run", env=env)
    code = await asyncio.wait_for(proc.wait(), 30)
    stderr = await stderr_of(proc)
    assert code == 2
    assert stderr.strip().count("\n") == 0 and "MAIL_SMTP_ADDR" in stderr
    assert "s3cret-value" not in stderr


async def test_a_reachable_listener_without_read_token_refuses_to_start(
    stub_env: dict[str, str],
) -> None:
    port = _port(stub_env)
    env = dict(stub_env, MAIL_INTERNAL_HTTP_ADDR=f"0.0.0.0:{port}")
    proc = await spawn("run", env=env)
    code = await asyncio.wait_for(proc.wait(), 30)
    stderr = await stderr_of(proc)
    assert code == 2, stderr
    assert stderr.strip().count("\n") == 0 and "MAIL_OPERATOR_READ_TOKEN: required" in stderr
    assert not await _port_open(port)
    check = await spawn("check", env=env)
    assert await asyncio.wait_for(check.wait(), 30) == 2
    assert "MAIL_OPERATOR_READ_TOKEN" in await stderr_of(check)

    opened = await spawn("run", env=dict(env, MAIL_INTERNAL_HTTP_OPEN_READS="true"))
    await wait_for(lambda: _ready(port), timeout=30)
    opened.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(opened.wait(), 10) == 0


async def test_check_rejects_a_broken_template(stub_env: dict[str, str], tmp_path: Path) -> None:
    catalog = tmp_path / "templates"
    broken = catalog / "welcome" / "en"
    broken.mkdir(parents=True)
    (broken / "subject.txt").write_text("Welcome {{ name }\n")
    (broken / "body.txt").write_text("Hello\n")
    proc = await spawn("check", env=dict(stub_env, MAIL_TEMPLATE_DIR=str(catalog)))
    code = await asyncio.wait_for(proc.wait(), 30)
    stderr = await stderr_of(proc)
    assert code != 0
    assert "subject.txt" in stderr and "Traceback" not in stderr
    ok = await spawn("check", env=stub_env)
    assert await asyncio.wait_for(ok.wait(), 30) == 0


async def test_kill_9_mid_stream_loses_nothing(
    pg_dsn: str, redis_addr: str, smtp_sink: SmtpSink
) -> None:
    env = daemon_env(
        pg_dsn,
        redis_addr,
        smtp_sink,
        MAIL_CONSUMER_RECLAIM_IDLE="1s",
        MAIL_LEASE_DURATION="3s",
        MAIL_SMTP_TIMEOUT="2s",
        MAIL_CONSUMER_NAME="first",
    )
    from maildaemon.config import Settings

    settings = Settings(
        _env_file=None, postgres_primary_dsn=pg_dsn, redis_master_addr=redis_addr, smtp_mode="stub"
    )
    db = Db(pg_dsn)
    proc = await spawn("run", env=env)
    await wait_for(lambda: _ready(_port(env)), timeout=30)
    await xadd(settings, *[command(f"k9-{i}") for i in range(400)])
    await wait_for(
        lambda: db.fetchval("SELECT count(*) >= 50 FROM mail.deliveries WHERE status = 'sent'"),
        timeout=30,
    )
    proc.kill()
    await proc.wait()
    env2 = dict(
        env, MAIL_CONSUMER_NAME="second", MAIL_INTERNAL_HTTP_ADDR=f"127.0.0.1:{pick_free_port()}"
    )
    proc2 = await spawn("run", env=env2)
    await wait_for(
        lambda: db.fetchval("SELECT count(*) = 400 FROM mail.deliveries WHERE status = 'sent'"),
        timeout=60,
    )
    proc2.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc2.wait(), 15) == 0
    received: dict[str, int] = {}
    for message in smtp_sink.messages:
        mid = message.parse()["Message-ID"]
        received[mid] = received.get(mid, 0) + 1
    assert len(received) == 400  # every delivery arrived
    duplicates = {mid for mid, n in received.items() if n > 1}
    flagged = {
        r["message_id"]
        for r in await db.fetch("SELECT message_id FROM mail.deliveries WHERE possible_duplicate")
    }
    assert duplicates <= flagged  # a second copy only where the record says it may happen


async def _dev(state: Path) -> tuple[asyncio.subprocess.Process, int]:
    """`maildaemon dev` as a new user starts it (no MAIL_ settings), once it is ready."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
    port = pick_free_port()
    proc = await spawn(
        "dev", "--state-dir", str(state), "--http-addr", f"127.0.0.1:{port}", env=env
    )
    try:
        await wait_for(lambda: _ready(port), timeout=90, interval=0.2)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc, port


def _dev_env(state: Path) -> dict[str, str]:
    lines = (state / "dev.env").read_text().splitlines()
    return {k: v.strip("'") for k, v in (line.split("=", 1) for line in lines)}


async def test_dev_stack_comes_up_and_its_smtp_server_offers_starttls(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    proc, port = await _dev(state)
    try:
        values = _dev_env(state)
        host, smtp_port = values["MAIL_SMTP_ADDR"].rsplit(":", 1)
        context = ssl.create_default_context(cafile=values["MAIL_SMTP_CA_FILE"])
        client = aiosmtplib.SMTP(
            hostname=host, port=int(smtp_port), start_tls=True, tls_context=context, timeout=10
        )
        await client.connect()
        assert client.is_connected and client.get_transport_info("sslcontext") is not None
        await client.sendmail("a@test.example", ["b@test.example"], b"Subject: hi\r\n\r\nhi\r\n")
        await client.quit()
        assert list((state / "smtp" / "maildir").glob("*.eml"))
        # /metrics is on by default in `maildaemon dev`.
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            assert response.status == 200
            text = await response.text()
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {"mail_attempt_schedule_depth", "mail_stream_consumer_lag"} <= names
        # The bounce loop: mail to bounce@ is taken by the sink, which reports it back a
        # moment later to the report listener: the delivery ends bounced.
        assert values["MAIL_BOUNCE_DOMAIN"] and values["MAIL_BOUNCE_LISTEN_ADDR"]
        redis_host, redis_port = values["MAIL_REDIS_MASTER_ADDR"].rsplit(":", 1)
        r = aioredis.Redis(host=redis_host, port=int(redis_port))
        try:
            doc = command("dev-bounce", to=[{"address": "bounce@example.com"}])
            await r.xadd("mail:delivery_commands", {"command": json.dumps(doc)})
        finally:
            await r.aclose()
        db = Db(values["MAIL_POSTGRES_PRIMARY_DSN"])
        await db.wait_status("dev-bounce", "bounced", timeout=30)
    finally:
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0


@pytest.mark.parametrize("between", [0.0, 0.3])
async def test_dev_stopped_by_two_ctrl_c_leaves_no_server_running(
    tmp_path: Path, between: float
) -> None:
    """An impatient second Ctrl-C (while the daemon shuts down, or while the servers stop)
    ends `maildaemon dev` at once, and its servers with it."""
    state = tmp_path / "dev"
    proc, _ = await _dev(state)
    try:
        values = _dev_env(state)
        addresses = [
            values[k].rsplit(":", 1)
            for k in ("MAIL_REDIS_MASTER_ADDR", "MAIL_SMTP_ADDR", "MAIL_BOUNCE_LISTEN_ADDR")
        ]
        pg_port = values["MAIL_POSTGRES_PRIMARY_DSN"].rsplit(":", 1)[1].split("/")[0]
        addresses.append(["127.0.0.1", pg_port])
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.sleep(between)
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code in (0, 130)
    still = []
    for host, p in addresses:
        try:
            _, writer = await asyncio.open_connection(host, int(p))
        except OSError:
            continue
        still.append(f"{host}:{p}")
        writer.close()
    assert not still, f"still listening after the second Ctrl-C: {still}"


async def test_sigterm_under_load_releases_claims_and_loses_nothing(
    pg_dsn: str, redis_addr: str, smtp_sink: SmtpSink
) -> None:
    from maildaemon.config import Settings

    env = daemon_env(
        pg_dsn,
        redis_addr,
        smtp_sink,
        MAIL_CONSUMER_NAME="first",
        MAIL_ATTEMPT_WORKER_CONCURRENCY="4",
    )
    settings = Settings(
        _env_file=None, postgres_primary_dsn=pg_dsn, redis_master_addr=redis_addr, smtp_mode="stub"
    )
    db = Db(pg_dsn)
    proc = await spawn("run", env=env)
    await wait_for(lambda: _ready(_port(env)), timeout=30)
    await xadd(settings, *[command(f"t-{i}") for i in range(400)])
    await wait_for(
        lambda: db.fetchval("SELECT count(*) >= 40 FROM mail.deliveries WHERE status = 'sent'"),
        timeout=30,
    )
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    # Nothing is left leased: unstarted claims were given back, in-flight ones finished.
    leased = await db.fetchval("SELECT count(*) FROM mail.deliveries WHERE status = 'sending'")
    assert leased == 0
    env2 = dict(
        env,
        MAIL_CONSUMER_NAME="second",
        MAIL_CONSUMER_RECLAIM_IDLE="1s",
        MAIL_INTERNAL_HTTP_ADDR=f"127.0.0.1:{pick_free_port()}",
    )
    proc2 = await spawn("run", env=env2)
    await wait_for(
        lambda: db.fetchval("SELECT count(*) = 400 FROM mail.deliveries WHERE status = 'sent'"),
        timeout=60,
    )
    proc2.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc2.wait(), 15) == 0
    ids = [m.parse()["Message-ID"] for m in smtp_sink.messages]
    assert len(ids) == 400 and len(set(ids)) == 400  # a clean stop sends nothing twice
