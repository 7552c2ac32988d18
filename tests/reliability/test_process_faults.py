"""Process faults against the real daemon process, checked with a ledger (issue 10, part E).

kill -9 at random moments, replicas with one killed, PostgreSQL and Redis restarts, an SMTP
outage, SIGTERM under load with a slow server. After each: nothing lost, nothing
unexpected, duplicates no more than the sends in flight at the kills, every duplicate
flagged, every copy with an attempt on record, no attempt left open. ``--long`` runs the
deep variants (20 kills over 10,000 messages, more messages everywhere).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from maildaemon.config import Settings
from maildaemon.devstack.postgres import EmbeddedPostgres, ensure_database, pick_free_port
from maildaemon.devstack.redis import EmbeddedRedis
from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.store.migrate import apply_migrations
from tests.acceptance.test_process import daemon_env
from tests.reliability.ledger import Daemon, elapsed, ledger, settle
from tests.support import Db, TcpProxy, command, wait_for, xadd

CONCURRENCY = 8
WINDOW = 4  # MAIL_RESULT_WINDOW: accepted-but-unrecorded messages per connection at most
FAST = {
    "MAIL_RESULT_WINDOW": str(WINDOW),
    "MAIL_LEASE_DURATION": "3s",
    "MAIL_SMTP_TIMEOUT": "2s",
    "MAIL_CONSUMER_RECLAIM_IDLE": "1s",
    "MAIL_ATTEMPT_WORKER_CONCURRENCY": str(CONCURRENCY),
    "MAIL_RETRY_LADDER": "1s,1s,1s,1s,1s,1s",
    "MAIL_LOG_LEVEL": "INFO",
}


def producer(pg_dsn: str, redis_addr: str) -> Settings:
    return Settings(
        _env_file=None, postgres_primary_dsn=pg_dsn, redis_master_addr=redis_addr, smtp_mode="stub"
    )


async def enqueue(settings: Settings, prefix: str, n: int) -> set[str]:
    ids = [f"{prefix}-{i}" for i in range(n)]
    for start in range(0, n, 500):
        await xadd(settings, *[command(d) for d in ids[start : start + 500]])
    return set(ids)


def env_for(
    pg_dsn: str, redis_addr: str, sink: SmtpSink, name: str, **extra: str
) -> dict[str, str]:
    values = {
        **FAST,
        "MAIL_CONSUMER_NAME": name,
        "MAIL_INTERNAL_HTTP_ADDR": f"127.0.0.1:{pick_free_port()}",
        **extra,
    }
    return daemon_env(pg_dsn, redis_addr, sink, **values)


async def sent_count(db: Db) -> int:
    return int(await db.fetchval("SELECT count(*) FROM mail.deliveries WHERE status = 'sent'"))


@pytest.mark.timeout(900)
async def test_kill_9_at_random_moments(
    pg_dsn: str, redis_addr: str, smtp_sink: SmtpSink, tmp_path: Path, long_run: bool
) -> None:
    n, kills = (10_000, 20) if long_run else (1_000, 3)
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    db = Db(pg_dsn)
    expected = await enqueue(producer(pg_dsn, redis_addr), "k9", n)
    started = time.monotonic()
    done_kills = 0
    for k in range(kills + 1):
        daemon = Daemon(env_for(pg_dsn, redis_addr, smtp_sink, f"k9-{k}"), tmp_path / f"{k}.log")
        await daemon.start()
        if k == kills:
            await settle(db, n, timeout=120 if not long_run else 600)
            assert await daemon.sigterm() == 0
            break
        await asyncio.sleep(rng.uniform(0.3, 2.0))
        if await sent_count(db) >= n:
            assert await daemon.sigterm() == 0
            break
        await daemon.kill9()
        done_kills += 1
    figures = await ledger(db, expected, [m.data for m in smtp_sink.messages])
    print(f"\n{figures.line(f'kill -9 x{done_kills} (seed {seed})')}; took {elapsed(started)}")
    figures.assert_sound(max_duplicates=done_kills * CONCURRENCY * WINDOW)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("replicas", [2, 3])
async def test_replicas_with_one_killed(
    pg_dsn: str,
    redis_addr: str,
    smtp_sink: SmtpSink,
    tmp_path: Path,
    long_run: bool,
    replicas: int,
) -> None:
    n = 5_000 if long_run else 600
    db = Db(pg_dsn)
    daemons = [
        Daemon(env_for(pg_dsn, redis_addr, smtp_sink, f"r{i}"), tmp_path / f"r{i}.log")
        for i in range(replicas)
    ]
    await asyncio.gather(*(d.start() for d in daemons))
    expected = await enqueue(producer(pg_dsn, redis_addr), "rep", n)
    await wait_for(lambda: _at_least(db, n // 5), timeout=60)
    await daemons[0].kill9()
    await settle(db, n, timeout=180)
    for d in daemons[1:]:
        assert await d.sigterm() == 0
    figures = await ledger(db, expected, [m.data for m in smtp_sink.messages])
    print(f"\n{figures.line(f'{replicas} replicas, one killed')}")
    figures.assert_sound(max_duplicates=CONCURRENCY * WINDOW)


async def _at_least(db: Db, count: int) -> bool:
    return await sent_count(db) >= count


@pytest.fixture
async def own_postgres(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedPostgres, str]]:
    """A PostgreSQL of this test's own, so it can be restarted."""
    server = EmbeddedPostgres(tmp_path / "pg", pick_free_port(), fast=True)
    admin = await asyncio.to_thread(server.start)
    dsn = await asyncio.to_thread(ensure_database, admin, "mail")
    await asyncio.to_thread(apply_migrations, dsn)
    try:
        yield server, dsn
    finally:
        await asyncio.to_thread(server.stop)


@pytest.mark.timeout(600)
async def test_postgres_restart(
    own_postgres: tuple[EmbeddedPostgres, str],
    redis_addr: str,
    smtp_sink: SmtpSink,
    tmp_path: Path,
    long_run: bool,
) -> None:
    server, dsn = own_postgres
    n = 5_000 if long_run else 800
    db = Db(dsn)
    daemon = Daemon(
        env_for(dsn, redis_addr, smtp_sink, "pg", MAIL_LEASE_DURATION="20s"),
        tmp_path / "pg.log",
    )
    await daemon.start()
    expected = await enqueue(producer(dsn, redis_addr), "pg", n)
    await wait_for(lambda: _at_least(db, n // 5), timeout=60)
    down = time.monotonic()
    await asyncio.to_thread(server.stop)
    await asyncio.sleep(2.0)
    await asyncio.to_thread(server.start)
    outage = elapsed(down)
    await settle(db, n, timeout=180)
    assert await daemon.sigterm() == 0
    figures = await ledger(db, expected, [m.data for m in smtp_sink.messages])
    print(f"\n{figures.line(f'PostgreSQL restart ({outage} down)')}")
    figures.assert_sound(max_duplicates=CONCURRENCY * WINDOW)


@pytest.mark.timeout(600)
async def test_redis_restart_with_aof_keeps_the_stream_and_group(
    pg_dsn: str, smtp_sink: SmtpSink, tmp_path: Path, long_run: bool
) -> None:
    n = 4_000 if long_run else 600
    redis = EmbeddedRedis(tmp_path / "redis", pick_free_port(), persistent=True)
    await asyncio.to_thread(redis.start)
    try:
        db = Db(pg_dsn)
        daemon = Daemon(env_for(pg_dsn, redis.addr, smtp_sink, "redis"), tmp_path / "r.log")
        await daemon.start()
        settings = producer(pg_dsn, redis.addr)
        expected = await enqueue(settings, "rd-a", n // 2)
        await asyncio.to_thread(redis.stop)  # entries may still be unread: AOF keeps them
        await asyncio.sleep(1.0)
        await asyncio.to_thread(redis.start)
        expected |= await enqueue(settings, "rd-b", n // 2)
        await settle(db, n, timeout=180)
        assert await daemon.sigterm() == 0
    finally:
        await asyncio.to_thread(redis.stop)
    events = [e["event"] for e in daemon.events()]
    assert "consumer group missing, recreating" not in events  # the group survived
    figures = await ledger(db, expected, [m.data for m in smtp_sink.messages])
    print(f"\n{figures.line('Redis restart (AOF)')}")
    figures.assert_sound(max_duplicates=0)


@pytest.mark.timeout(600)
async def test_smtp_outage(
    pg_dsn: str, redis_addr: str, smtp_sink: SmtpSink, tmp_path: Path, long_run: bool
) -> None:
    n = 5_000 if long_run else 800
    proxy = TcpProxy(smtp_sink.host, smtp_sink.port)
    await proxy.start()
    db = Db(pg_dsn)
    daemon = Daemon(
        env_for(pg_dsn, redis_addr, smtp_sink, "out", MAIL_SMTP_ADDR=f"127.0.0.1:{proxy.port}"),
        tmp_path / "out.log",
    )
    await daemon.start()
    expected = await enqueue(producer(pg_dsn, redis_addr), "out", n)
    await wait_for(lambda: _at_least(db, n // 5), timeout=60)
    await proxy.cut()
    await asyncio.sleep(5.0)
    failed = await db.fetchval(
        "SELECT count(*) FROM mail.attempts WHERE status NOT IN ('sent', 'started')"
    )
    # What they were, for the assertion's message: status, stage of the reply, worker.
    why = await db.fetch(
        "SELECT status, left(coalesce(reply_text, ''), 80) AS reply, worker, count(*) "
        "FROM mail.attempts WHERE status NOT IN ('sent', 'started') GROUP BY 1, 2, 3"
    )
    before = await sent_count(db)
    await proxy.start()
    back = time.monotonic()
    await wait_for(lambda: _at_least(db, before + 1), timeout=30, interval=0.05)
    resumed = elapsed(back)
    await settle(db, n, timeout=180)
    cleared = elapsed(back)
    assert await daemon.sigterm() == 0
    await proxy.cut()
    events = [e["event"] for e in daemon.events()]
    assert "destination down" in events and "destination up" in events
    figures = await ledger(db, expected, [m.data for m in smtp_sink.messages])
    print(
        f"\n{figures.line('SMTP outage of 5 s')}; failed attempts during the outage: "
        f"{failed}; sending resumed {resumed} and the backlog cleared {cleared} after the "
        "server came back"
    )
    # One per connection (the transaction in flight when the link broke) and the one
    # session failure that found the destination down; every later one is held, not charged.
    assert failed <= CONCURRENCY + 1, [tuple(r) for r in why]
    figures.assert_sound(max_duplicates=CONCURRENCY)


@pytest.mark.timeout(600)
async def test_sigterm_under_load_with_a_slow_server(
    pg_dsn: str, redis_addr: str, smtp_sink: SmtpSink, scripted: SmtpSink, tmp_path: Path
) -> None:
    slow = scripted
    slow.behaviour.delays["end of data"] = 1.5  # past the shutdown timeout: sends are cut
    db = Db(pg_dsn)
    extra = {
        "MAIL_SMTP_ADDR": slow.addr,
        "MAIL_SMTP_CA_FILE": str(slow.ca_file),
        "MAIL_SHUTDOWN_TIMEOUT": "1s",
        "MAIL_SMTP_TIMEOUT": "5s",
        "MAIL_LEASE_DURATION": "8s",
    }
    first = Daemon(env_for(pg_dsn, redis_addr, smtp_sink, "t1", **extra), tmp_path / "1.log")
    await first.start()
    n = 200
    expected = await enqueue(producer(pg_dsn, redis_addr), "st", n)
    await wait_for(lambda: _at_least(db, 2 * CONCURRENCY), timeout=60)
    signalled = time.time()
    await first.sigterm(timeout=15)
    late = [c.at for c in slow.commands if c.verb == "MAIL" and c.at > signalled + 0.05]
    in_flight = await db.fetchval("SELECT count(*) FROM mail.attempts WHERE status='started'")
    second = Daemon(env_for(pg_dsn, redis_addr, smtp_sink, "t2", **extra), tmp_path / "2.log")
    slow.behaviour.delays.clear()
    await second.start()
    await settle(db, n, timeout=120)
    assert await second.sigterm() == 0
    figures = await ledger(db, expected, [m.data for m in slow.messages])
    print(
        f"\n{figures.line('SIGTERM under load, slow server')}; MAIL FROM after the signal: "
        f"{len(late)}; attempts cut at the deadline: {in_flight}"
    )
    assert late == []  # no new SMTP transaction after SIGTERM
    figures.assert_sound(max_duplicates=in_flight)
