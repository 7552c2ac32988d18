"""PostgreSQL in production: behind PgBouncer (transaction pooling), a primary that turns
read-only (failover), and TLS with ``sslmode=verify-full``."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import psycopg
import pytest
import trustme
from psycopg import sql

from maildaemon.config import Settings
from maildaemon.devstack.postgres import EmbeddedPostgres, database_dsn
from maildaemon.errors import StartupError
from tests.prod_servers import debian_binary, pgbouncer, shared_dir
from tests.support import Db, command, running_app, wait_for, xadd


def _dbname(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


def _via(dsn: str, port: int, host: str = "127.0.0.1", query: str = "") -> str:
    parts = urlsplit(dsn)
    user = f"{parts.username}@" if parts.username else ""
    return f"postgresql://{user}{host}:{port}{parts.path}{'?' + query if query else ''}"


@pytest.mark.parametrize("listen", [False, True], ids=["polling", "listen-dsn"])
async def test_delivers_behind_pgbouncer_transaction_pooling(
    make_settings: Callable[..., Settings], pg_dsn: str, smtp_sink: object, listen: bool
) -> None:
    """Two server connections shared by the pool, the migrations and the CLI's store: a
    prepared statement cached on one would be missing on the other."""
    pg_port = urlsplit(pg_dsn).port
    assert pg_port is not None
    with shared_dir("maildaemon-pgbouncer-") as directory, pgbouncer(directory, pg_port) as port:
        settings = make_settings(
            postgres_primary_dsn=_via(pg_dsn, port),
            postgres_pgbouncer=True,
            postgres_listen_dsn=pg_dsn if listen else None,
            postgres_pool_max=6,
        )
        db = Db(pg_dsn)
        ids = [f"bouncer-{i}" for i in range(40)]
        async with running_app(settings):
            await xadd(settings, *(command(i) for i in ids))

            async def all_sent() -> bool:
                count = await db.fetchval(
                    "SELECT count(*) FROM mail.deliveries WHERE status = 'sent'"
                )
                return bool(count == len(ids))

            await wait_for(all_sent, timeout=60)
        attempts = await db.fetchval("SELECT count(*) FROM mail.attempts")
        assert attempts == len(ids)


async def test_without_pgbouncer_mode_startup_names_the_problem(
    make_settings: Callable[..., Settings], pg_dsn: str
) -> None:
    """The counter-proof: the direct-connection settings do not pass PgBouncer (it refuses
    the startup parameter jit); the daemon stops with one line, not a traceback."""
    pg_port = urlsplit(pg_dsn).port
    assert pg_port is not None
    with shared_dir("maildaemon-pgbouncer-") as directory, pgbouncer(directory, pg_port) as port:
        settings = make_settings(postgres_primary_dsn=_via(pg_dsn, port))
        with pytest.raises(StartupError, match="jit"):
            async with running_app(settings):
                pass


async def test_read_only_primary_is_an_outage_the_daemon_rides_out(
    make_settings: Callable[..., Settings],
    pg_server: str,
    pg_dsn: str,
    smtp_sink: object,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failover as the daemon sees it: its connections are cut, the server it reaches
    again refuses writes (a demoted primary), and later writes again. Nothing crashes,
    nothing is lost, and it resumes by itself (its pooled read-only sessions recycled)."""
    caplog.set_level(logging.WARNING)
    settings = make_settings()
    db = Db(pg_dsn)
    name = sql.Identifier(_dbname(pg_dsn))
    admin = await psycopg.AsyncConnection.connect(pg_server, autocommit=True)
    try:
        async with running_app(settings) as app:
            await xadd(settings, command("before"))
            await db.wait_status("before", "sent")
            await admin.execute(
                sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(name)
            )
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (_dbname(pg_dsn),),
            )
            await xadd(settings, command("during-1"), command("during-2"))

            def read_only_seen() -> bool:
                return any(
                    r.getMessage() == "postgres read-only, connections recycled"
                    for r in caplog.records
                )

            async def seen() -> bool:
                return read_only_seen()

            await wait_for(seen, timeout=20)
            await asyncio.sleep(1.0)  # a few backoff rounds against the read-only server
            assert app.readiness.workers_running
            await admin.execute(
                sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(name)
            )
            for delivery_id in ("during-1", "during-2"):
                assert await db.wait_status(delivery_id, "sent", timeout=40) == "sent"
            assert not any(r.getMessage() == "component crashed" for r in caplog.records)
    finally:
        await admin.execute(
            sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(name)
        )
        await admin.close()


def _tls_postgres(directory: Path, ca: trustme.CA) -> EmbeddedPostgres:
    """A PostgreSQL that accepts only TLS (hostssl), its certificate for 'localhost' only."""
    # pgserver's build has no SSL: Debian's PostgreSQL has.
    postgres = debian_binary("postgres", "postgresql", Path("/usr/lib/postgresql").glob("*/bin"))
    server = EmbeddedPostgres(directory, fast=True, bin_dir=Path(postgres).parent)
    server.start()
    server.stop()
    data = server.data_dir
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(data / "server.crt"))
    cert.private_key_pem.write_to_path(str(data / "server.key"))
    (data / "pg_hba.conf").write_text(
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n"
    )
    with (data / "postgresql.conf").open("a") as conf:
        conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
    for path in ("server.crt", "server.key", "pg_hba.conf"):
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(data / path, nobody.pw_uid, nobody.pw_gid)
        (data / path).chmod(0o600)
    server.start()
    return server


async def test_postgres_tls_verify_full(
    make_settings: Callable[..., Settings], tmp_path: Path, smtp_sink: object
) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "pg-ca.pem"))
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    server = await asyncio.to_thread(_tls_postgres, tmp_path / "pg-tls", ca)
    try:
        base = database_dsn(server.dsn, "postgres")
        good = _via(
            base, server.port, "localhost", f"sslmode=verify-full&sslrootcert={tmp_path}/pg-ca.pem"
        )
        settings = make_settings(postgres_primary_dsn=good)  # migrations run over TLS too
        async with running_app(settings):
            await xadd(settings, command("over-tls"))
            assert await Db(good).wait_status("over-tls", "sent") == "sent"
            assert await Db(good).fetchval(
                "SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) "
                "WHERE application_name = 'maildaemon'"
            )
        refused = {
            "wrong CA": _via(
                base,
                server.port,
                "localhost",
                f"sslmode=verify-full&sslrootcert={tmp_path}/other-ca.pem",
            ),
            "name mismatch": _via(
                base,
                server.port,
                "127.0.0.1",
                f"sslmode=verify-full&sslrootcert={tmp_path}/pg-ca.pem",
            ),
            "no TLS": _via(base, server.port, "localhost", "sslmode=disable"),
        }
        for why, dsn in refused.items():
            with pytest.raises((OSError, asyncpg.PostgresError)):
                conn = await asyncpg.connect(dsn, timeout=10)
                await conn.close()
                pytest.fail(f"{why}: connected")
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(server.data_dir, ignore_errors=True)
