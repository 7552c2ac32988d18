"""Redis in production: TLS with a client certificate, and Sentinel with a real failover."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import trustme
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from maildaemon.config import Settings
from maildaemon.errors import StartupError
from maildaemon.redisconn import redis_client
from tests.prod_servers import TlsFiles, redis_sentinel, redis_server, redis_tls_server
from tests.support import Db, command, running_app, wait_for, xadd

MASTER = "mailmaster"


@pytest.fixture
def tls_files(tmp_path: Path) -> Iterator[tuple[TlsFiles, TlsFiles, trustme.CA]]:
    """(server files, client files, the CA) from one test CA."""
    ca = trustme.CA()
    server, client = ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("maildaemon")
    files = []
    for name, cert in (("server", server), ("client", client)):
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))
        files.append(
            TlsFiles(tmp_path / "ca.pem", tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
        )
    yield files[0], files[1], ca


async def test_redis_tls_with_client_certificate_delivers(
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    tls_files: tuple[TlsFiles, TlsFiles, trustme.CA],
    smtp_sink: object,
) -> None:
    server, client, _ca = tls_files
    with redis_tls_server(tmp_path / "redis-tls", server) as port:
        settings = make_settings(
            redis_master_addr=f"rediss://127.0.0.1:{port}",
            redis_tls_ca_file=client.ca,
            redis_tls_cert_file=client.cert,
            redis_tls_key_file=client.key,
        )
        async with running_app(settings):
            await xadd(settings, command("tls-1"))
            assert await Db(settings.dsn).wait_status("tls-1", "sent") == "sent"
        # Plain TCP to the TLS-only port gets nowhere.
        plain = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        with pytest.raises(redis.ConnectionError):
            plain.ping()
        plain.close()


async def test_redis_tls_refuses_an_unknown_ca_and_a_missing_client_certificate(
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    tls_files: tuple[TlsFiles, TlsFiles, trustme.CA],
) -> None:
    server, client, _ca = tls_files
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    with redis_tls_server(tmp_path / "redis-tls", server) as port:
        addr = f"rediss://127.0.0.1:{port}"
        wrong_ca = make_settings(
            redis_master_addr=addr,
            redis_tls_ca_file=tmp_path / "other-ca.pem",
            redis_tls_cert_file=client.cert,
            redis_tls_key_file=client.key,
        )
        with pytest.raises(StartupError, match="redis ping"):
            async with running_app(wrong_ca):
                pass
        no_cert = make_settings(redis_master_addr=addr, redis_tls_ca_file=client.ca)
        conn = redis_client(no_cert)
        # The refusal is immediate; without this the client's own retries with backoff
        # take about 50 s to give up on it.
        conn.set_retry(Retry(NoBackoff(), 0))
        with pytest.raises(redis.RedisError):
            await conn.ping()
        await conn.aclose()


async def test_sentinel_and_master_over_tls(
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    tls_files: tuple[TlsFiles, TlsFiles, trustme.CA],
    smtp_sink: object,
) -> None:
    """The sentinel and the master it names both speak TLS only: one set of TLS settings
    serves both connections."""
    server, client, _ca = tls_files
    with (
        redis_tls_server(tmp_path / "master", server) as master,
        redis_sentinel(tmp_path / "sentinel", MASTER, master, tls=server) as sentinel,
    ):
        settings = make_settings(
            redis_sentinels=f"127.0.0.1:{sentinel}",
            redis_master_name=MASTER,
            redis_tls=True,
            redis_tls_ca_file=client.ca,
            redis_tls_cert_file=client.cert,
            redis_tls_key_file=client.key,
        )
        async with running_app(settings):
            await xadd(settings, command("sentinel-tls"))
            assert await Db(settings.dsn).wait_status("sentinel-tls", "sent") == "sent"


async def _sentinel_master(sentinel_port: int) -> tuple[str, int] | None:
    client = redis.asyncio.Redis(host="127.0.0.1", port=sentinel_port, decode_responses=True)
    try:
        found = await client.sentinel_get_master_addr_by_name(MASTER)
        return (str(found[0]), int(found[1])) if found else None
    finally:
        await client.aclose()


async def _replica_known(sentinel_port: int) -> bool:
    client = redis.asyncio.Redis(host="127.0.0.1", port=sentinel_port, decode_responses=True)
    try:
        replicas = await client.sentinel_slaves(MASTER)
    finally:
        await client.aclose()
    return any("s_down" not in r["flags"] and r.get("master-link-status") == "ok" for r in replicas)


async def test_sentinel_failover_is_ridden_out(
    make_settings: Callable[..., Settings], tmp_path: Path, smtp_sink: object
) -> None:
    """The master is found through the sentinel; after a failover the daemon reads the
    stream on the new master and delivers what arrives there, without a restart."""
    with (
        redis_server(tmp_path / "master") as master,
        redis_server(tmp_path / "replica", replica_of=master) as replica,
        redis_sentinel(tmp_path / "sentinel", MASTER, master) as sentinel,
    ):
        settings = make_settings(redis_sentinels=f"127.0.0.1:{sentinel}", redis_master_name=MASTER)
        db = Db(settings.dsn)
        async with running_app(settings):
            await xadd(settings, command("before-failover"))
            await db.wait_status("before-failover", "sent")
            await wait_for(lambda: _replica_known(sentinel), timeout=30, interval=0.2)
            admin = redis.asyncio.Redis(host="127.0.0.1", port=sentinel)
            await admin.execute_command("SENTINEL", "FAILOVER", MASTER)
            await admin.aclose()

            async def promoted() -> bool:
                return await _sentinel_master(sentinel) == ("127.0.0.1", replica)

            await wait_for(promoted, timeout=30, interval=0.2)
            await asyncio.sleep(0.5)
            # The new command lands on the new master (xadd asks the sentinel too).
            await xadd(settings, command("after-failover"))
            assert await db.wait_status("after-failover", "sent", timeout=40) == "sent"
        new_master = redis.Redis(host="127.0.0.1", port=replica)
        pending = new_master.xpending(settings.command_stream, settings.consumer_group)
        new_master.close()
        assert pending["pending"] == 0


async def test_master_demoted_behind_a_fixed_address_is_ridden_out(
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    smtp_sink: object,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without Sentinel: the address the daemon uses turns into a replica (READONLY) for a
    while, then is promoted again. The consumer waits it out instead of crashing."""
    with (
        redis_server(tmp_path / "a") as port_a,
        redis_server(tmp_path / "b", replica_of=port_a) as port_b,
    ):
        settings = make_settings(redis_master_addr=f"127.0.0.1:{port_a}")
        db = Db(settings.dsn)
        a = redis.asyncio.Redis(host="127.0.0.1", port=port_a)
        b = redis.asyncio.Redis(host="127.0.0.1", port=port_b)
        try:
            async with running_app(settings) as app:
                await xadd(settings, command("on-a"))
                await db.wait_status("on-a", "sent")
                await b.replicaof("NO", "ONE")
                await a.replicaof("127.0.0.1", str(port_b))

                async def seen() -> bool:  # READONLY / UNBLOCKED from the demoted master
                    return any(r.getMessage() == "redis unavailable" for r in caplog.records)

                await wait_for(seen, timeout=20)
                assert app.readiness.workers_running
                await a.replicaof("NO", "ONE")
                await b.replicaof("127.0.0.1", str(port_a))
                await xadd(settings, command("on-a-again"))
                assert await db.wait_status("on-a-again", "sent", timeout=30) == "sent"
        finally:
            await a.aclose()
            await b.aclose()
