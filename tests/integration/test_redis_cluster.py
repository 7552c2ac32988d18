"""The daemon on a real Redis Cluster (three masters from Debian's redis-server).

End to end through the cluster: commands in (XADD through a cluster client), mail out (the
STARTTLS sink), events out (the event stream, on another master than the commands), the
stream trimmed, the wake-up subscribed on the master that holds the command stream; a
cross-slot key layout refused at startup; and a master killed (its replica takes over)
while the daemon runs: nothing lost, the daemon does not stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import RedisError

from maildaemon.cli import main as cli
from maildaemon.config import Settings
from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.errors import StartupError
from maildaemon.pipeline.persistence import redis_persistence
from maildaemon.redisconn import redis_client
from tests.integration.test_redis_production import tls_files
from tests.prod_servers import TlsFiles
from tests.redis_cluster import REDIS_SERVER, RedisCluster
from tests.support import Db, command, running_app, wait_for, xadd

MakeSettings = Callable[..., Settings]
__all__ = ["tls_files"]  # the fixture, shared with test_redis_production
pytestmark = pytest.mark.skipif(not REDIS_SERVER.exists(), reason="needs /usr/bin/redis-server")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with RedisCluster(tmp_path_factory.mktemp("cluster"), masters=3) as c:
        yield c


@pytest.fixture(scope="module")
def replicated_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with RedisCluster(tmp_path_factory.mktemp("cluster-r"), masters=3, replicas=1) as c:
        yield c


def _cluster_settings(make: MakeSettings, cluster: RedisCluster, **more: object) -> Settings:
    cluster.flush()
    return make(
        redis_cluster=True,
        redis_master_addr=cluster.addrs[0],
        redis_cluster_nodes=",".join(cluster.addrs[1:]),
        command_stream_trim_interval="0.2s",
        **more,
    )


async def _events(settings: Settings) -> list[dict[str, object]]:
    client = redis_client(settings)
    try:
        entries = await client.xrange(settings.event_stream)
    finally:
        await client.aclose()
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


async def _subscribed(port: int, settings: Settings) -> bool:
    """Someone listens for the command stream's keyspace events on this node."""
    node = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        counts = await node.pubsub_numsub(f"__keyspace@0__:{settings.command_stream}")
    finally:
        await node.aclose()
    return bool(counts and counts[0][1] >= 1)


async def _sent_all(db: Db, n: int) -> bool:
    sent = await db.fetchval("SELECT count(*) FROM mail.deliveries WHERE status = 'sent'")
    return bool(sent == n)


async def test_commands_in_mail_out_events_out_through_a_cluster(
    make_settings: MakeSettings, cluster: RedisCluster, smtp_sink: SmtpSink
) -> None:
    s = _cluster_settings(make_settings, cluster)
    commands_at, events_at = cluster.owner(s.command_stream), cluster.owner(s.event_stream)
    assert commands_at != events_at  # two masters: a cross-node layout is exercised
    db = Db(s.dsn)
    async with running_app(s):
        ids = await xadd(
            s, *(command(f"cl-{i}", to=[{"address": f"u{i}@example.com"}]) for i in range(30))
        )
        await wait_for(lambda: _sent_all(db, 30), timeout=30)

        async def events_out() -> bool:
            return len(await _events(s)) >= 30

        await wait_for(events_out, timeout=15)

        async def trimmed() -> bool:
            client = redis_client(s)
            try:
                return bool(await client.xlen(s.command_stream) <= 1)
            finally:
                await client.aclose()

        await wait_for(trimmed, timeout=15)
        # The wake-up listens on the master that holds the command stream, where the
        # notifications were turned on (they are node-local in a Cluster).
        owner = aioredis.Redis(host="127.0.0.1", port=commands_at)
        try:
            flags = (await owner.config_get("notify-keyspace-events"))["notify-keyspace-events"]
            assert "K" in flags and ("t" in flags or "A" in flags)

            await wait_for(lambda: _subscribed(commands_at, s), timeout=10)
        finally:
            await owner.aclose()
        # A command added now is taken in at once: woken, not found by a slow poll.
        [late] = await xadd(s, command("cl-late"))
        await db.wait_status("cl-late", "sent", timeout=10)
    assert len(smtp_sink.messages) == 31
    rows = await db.fetch(
        "SELECT stream_entry_id FROM mail.deliveries WHERE delivery_id LIKE 'cl-%'"
    )
    assert sorted(r["stream_entry_id"] for r in rows) == sorted([*ids, late])
    events = await _events(s)
    delivered = {e["delivery_id"] for e in events if e.get("status") == "sent"}
    assert {f"cl-{i}" for i in range(30)} <= delivered


async def test_hash_tagged_names_share_one_slot_and_run(
    make_settings: MakeSettings, cluster: RedisCluster
) -> None:
    s = _cluster_settings(
        make_settings,
        cluster,
        smtp_mode="stub",
        command_stream="{mail}:delivery_commands",
        event_stream="{mail}:delivery_events",
    )
    assert key_slot(s.command_stream.encode()) == key_slot(s.event_stream.encode())
    db = Db(s.dsn)
    async with running_app(s):
        await xadd(s, command("tag-1"))
        await db.wait_status("tag-1", "suppressed", "sent", timeout=15)


async def test_the_command_streams_slot_migrated_mid_run_is_followed(
    make_settings: MakeSettings, cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="maildaemon")
    s = _cluster_settings(make_settings, cluster, smtp_mode="stub")
    db = Db(s.dsn)
    async with running_app(s):
        await xadd(s, *(command(f"mv-a{i}") for i in range(10)))
        await wait_for(lambda: _ended(db, 10), timeout=20)
        before = cluster.owner(s.command_stream)
        await wait_for(lambda: _subscribed(before, s), timeout=10)
        target = next(p for p in cluster.masters_ports() if p != before)
        # Mid-run: the consumer's next reads are redirected (ASK during the move, then
        # MOVED); entries, group and pending list move with the key.
        await asyncio.to_thread(cluster.migrate_slot, s.command_stream, target)
        assert cluster.owner(s.command_stream) == target
        await xadd(s, *(command(f"mv-b{i}") for i in range(10)))
        await wait_for(lambda: _ended(db, 20), timeout=20)
        await wait_for(lambda: _subscribed(target, s), timeout=10)
    seen = [r.getMessage() for r in caplog.records]
    assert "stream wake-up follows the stream's master" in seen
    assert "component crashed" not in seen
    assert await db.fetchval("SELECT count(*) FROM mail.deliveries") == 20


async def _ended(db: Db, n: int) -> bool:
    done = await db.fetchval("SELECT count(*) FROM mail.deliveries WHERE status <> 'queued'")
    return bool(done == n)


async def test_persistence_counts_as_on_only_when_every_master_has_it(
    make_settings: MakeSettings, cluster: RedisCluster
) -> None:
    s = _cluster_settings(make_settings, cluster)
    client = redis_client(s)
    masters = cluster.masters_ports()
    try:
        assert await redis_persistence(client) == (False, "everysec")
        for port in masters[:-1]:
            with cluster.client(port) as node:
                node.config_set("appendonly", "yes")
        assert (await redis_persistence(client))[0] is False  # one master would lose data
        with cluster.client(masters[-1]) as node:
            node.config_set("appendonly", "yes")
        assert await redis_persistence(client) == (True, "everysec")
    finally:
        for port in masters:
            with cluster.client(port) as node:
                node.config_set("appendonly", "no")
        await client.aclose()


async def test_a_cluster_seed_that_is_not_a_cluster_is_a_startup_error(
    make_settings: MakeSettings, redis_addr: str
) -> None:
    s = make_settings(redis_cluster=True, redis_master_addr=redis_addr)
    with pytest.raises(StartupError, match=r"redis ping: .*[Cc]luster mode is not enabled"):
        async with running_app(s):
            pass


async def test_a_master_killed_mid_run_is_ridden_out(
    make_settings: MakeSettings,
    replicated_cluster: RedisCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="maildaemon")
    c = replicated_cluster
    s = _cluster_settings(make_settings, c, consumer_reclaim_idle="2s")
    db = Db(s.dsn)
    async with running_app(s) as app:
        await xadd(s, *(command(f"fo-a{i}") for i in range(20)))
        await wait_for(lambda: _sent_all(db, 20), timeout=30)
        ping = app.readiness.checks["redis"]
        assert await ping()
        master = c.owner(s.command_stream)
        c.kill(master)
        with pytest.raises(RedisError):  # /readyz: not ready while intake cannot go on
            await ping()

        async def promoted() -> bool:
            try:
                return await asyncio.to_thread(c.owner, s.command_stream) != master
            except Exception:
                return False

        await wait_for(promoted, timeout=30, interval=0.2)
        await asyncio.to_thread(c.wait_ok)
        # Commands added after the failover reach the new master and are all delivered.
        for _attempt in range(50):
            with contextlib.suppress(Exception):
                await xadd(s, *(command(f"fo-b{i}") for i in range(20)))
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("XADD never succeeded after the failover")
        await wait_for(lambda: _sent_all(db, 40), timeout=60)
        assert await ping()  # ready again, on the new master

        async def events_after_failover() -> bool:
            sent = {e["delivery_id"] for e in await _events(s) if e.get("status") == "sent"}
            return {f"fo-b{i}" for i in range(20)} <= sent

        await wait_for(events_after_failover, timeout=30)
        # The wake-up followed the stream to its new master.
        await wait_for(lambda: _subscribed(c.owner(s.command_stream), s), timeout=10)
    # Nothing was sent twice for want of a record (replays are recognised as such).
    assert await db.fetchval("SELECT count(*) FROM mail.deliveries") == 40
    seen = [r.getMessage() for r in caplog.records]
    # The daemon felt the failover (else the test proves nothing).
    assert "redis unavailable" in seen, sorted(set(seen))


def test_enqueue_writes_through_the_cluster(
    cluster: RedisCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cluster.flush()
    for name in [k for k in os.environ if k.startswith("MAIL_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    monkeypatch.setenv("MAIL_REDIS_CLUSTER", "true")
    monkeypatch.setenv("MAIL_REDIS_MASTER_ADDR", cluster.addrs[1])
    monkeypatch.setenv("MAIL_TEMPLATE_DIR", str(Path(__file__).parents[2] / "templates"))
    argv = ["enqueue", "--to", "ada@example.com", "--template", "signin_code"]
    code = cli.main([*argv, "--var", "code=1", "--var", "expires_minutes=5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    added = json.loads(out)
    with cluster.client(cluster.owner("mail:delivery_commands")) as owner:
        [(entry_id, fields)] = owner.xrange("mail:delivery_commands")
    assert entry_id.decode() == added["stream_entry_id"]
    assert json.loads(fields[b"command"])["to"] == ["ada@example.com"]


async def test_a_tls_cluster_with_client_certificates_delivers(
    make_settings: MakeSettings,
    tmp_path: Path,
    tls_files: tuple[TlsFiles, TlsFiles, object],
) -> None:
    server, client, _ca = tls_files
    with RedisCluster(tmp_path / "tls-cluster", masters=3, tls=server) as c:
        s = make_settings(
            redis_cluster=True,
            redis_master_addr=f"rediss://{c.addrs[0]}",
            redis_cluster_nodes=f"rediss://{c.addrs[1]}",
            redis_tls_ca_file=client.ca,
            redis_tls_cert_file=client.cert,
            redis_tls_key_file=client.key,
        )
        assert s.redis_tls_enabled
        db = Db(s.dsn)
        async with running_app(s):
            await xadd(s, *(command(f"tls-{i}") for i in range(5)))
            await wait_for(lambda: _sent_all(db, 5), timeout=30)
        # Plain text is refused by every node: the daemon really spoke TLS.
        plain = aioredis.Redis(port=c.ports[0], socket_timeout=2)
        try:
            with pytest.raises(RedisError):
                await plain.ping()
        finally:
            await plain.aclose()
