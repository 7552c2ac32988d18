"""Shared fixtures: real PostgreSQL, Redis and an SMTP sink with STARTTLS, no Docker.

Session servers start once (embedded) unless ``MAIL_TEST_POSTGRES_DSN`` /
``MAIL_TEST_REDIS_ADDR`` name existing ones. Each test gets a fresh database cloned from
the migrated template ``mail_template``, a flushed Redis, and its own in-process sink.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import psycopg
import pytest
import redis
import trustme
from psycopg import sql

from maildaemon.config import Settings
from maildaemon.config_values import split_host_port
from maildaemon.devstack.postgres import EmbeddedPostgres, database_dsn, pick_free_port
from maildaemon.devstack.redis import EmbeddedRedis
from maildaemon.devstack.smtp_sink import SinkBehaviour, SmtpSink
from maildaemon.store.migrate import apply_migrations

REPO = Path(__file__).resolve().parent.parent
TEMPLATE_DB = "mail_template"


def pytest_addoption(parser: pytest.Parser) -> None:
    with contextlib.suppress(ValueError):  # defined already by another conftest
        parser.addoption(
            "--long",
            action="store_true",
            default=False,
            help="deep reliability runs (tests/reliability): more messages, more faults",
        )


@pytest.fixture(scope="session")
def long_run(request: pytest.FixtureRequest) -> bool:
    """True under ``pytest --long``: the reliability suite runs its deep variants."""
    return bool(request.config.getoption("--long"))


def pytest_configure(config: pytest.Config) -> None:
    """Servers named by MAIL_TEST_POSTGRES_DSN / MAIL_TEST_REDIS_ADDR are shared: several
    test processes (pytest-xdist) would recreate the template and flush Redis under each
    other, so they are refused with a word on what to run instead."""
    shared = [v for v in ("MAIL_TEST_POSTGRES_DSN", "MAIL_TEST_REDIS_ADDR") if os.environ.get(v)]
    if shared and (config.getoption("numprocesses", None) or 0) > 0:
        raise pytest.UsageError(
            f"{' and '.join(shared)} set: every test process would use the same servers; "
            "run the tests in one process (MAIL_TEST_WORKERS=0 ./scripts/test, or pytest -n 0)"
        )


def _admin(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True)


def _create_template(admin_dsn: str) -> None:
    name = sql.Identifier(TEMPLATE_DB)
    with _admin(admin_dsn) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(name))
    apply_migrations(database_dsn(admin_dsn, TEMPLATE_DB))


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Admin DSN of the test server, with ``mail_template`` created and migrated."""
    external = os.environ.get("MAIL_TEST_POSTGRES_DSN")
    if external:
        _create_template(external)
        yield external
        return
    requested = tmp_path_factory.mktemp("postgres")
    server = EmbeddedPostgres(requested, fast=True)
    try:
        dsn = server.start()
        _create_template(dsn)
        yield dsn
    finally:
        server.stop()
        if server.data_dir != requested:  # as root the data lives outside pytest's tmp dir
            shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.fixture
def pg_dsn(pg_server: str) -> Iterator[str]:
    """DSN of a fresh database with the schema migrated (a copy of ``mail_template``)."""
    dbname = f"t_{uuid.uuid4().hex}"
    name = sql.Identifier(dbname)
    with _admin(pg_server) as conn:
        template = sql.Identifier(TEMPLATE_DB)
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(name, template))
    try:
        yield database_dsn(pg_server, dbname)
    finally:
        with _admin(pg_server) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of the test Redis."""
    external = os.environ.get("MAIL_TEST_REDIS_ADDR")
    if external:
        yield external
        return
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.addr


@pytest.fixture
def redis_addr(redis_server: str) -> str:
    """``host:port`` of the test Redis, flushed before the test."""
    host, port = split_host_port(redis_server, 6379)
    with redis.Redis(host=host, port=port) as client:
        client.flushall()
    return redis_server


@pytest.fixture(scope="session")
def smtp_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def smtp_sink(tmp_path: Path, smtp_ca: trustme.CA) -> AsyncIterator[SmtpSink]:
    """An SMTP sink with STARTTLS in the test's event loop; script it via ``.behaviour``."""
    sink = SmtpSink(tmp_path / "sink-maildir", behaviour=SinkBehaviour(), ca=smtp_ca)
    await sink.start()
    try:
        yield sink
    finally:
        await sink.stop()


@pytest.fixture
def make_settings(pg_dsn: str, redis_addr: str, smtp_sink: SmtpSink) -> Callable[..., Settings]:
    """``make_settings(**overrides) -> Settings`` pointed at this test's servers.

    The environment and ``.env`` are ignored: what a test needs, it passes as overrides.
    """

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "postgres_primary_dsn": pg_dsn,
            "redis_master_addr": redis_addr,
            "smtp_mode": "smtp",
            "smtp_security": "starttls",
            "smtp_addr": f"{smtp_sink.host}:{smtp_sink.port}",
            "smtp_from": "maildaemon test <noreply@test.example>",
            "smtp_ca_file": smtp_sink.ca_file,
            "template_dir": REPO / "templates",
            "internal_http_addr": f"127.0.0.1:{pick_free_port()}",
            "shutdown_timeout": 5,
            "lease_duration": 60,
            "smtp_timeout": 10,
            "retry_ladder": "1s,1s",
            "consumer_block": "0.2s",
            "scheduler_poll_interval": "0.2s",
        }
        values.update(overrides)
        clean_env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
        with mock.patch.dict(os.environ, clean_env, clear=True):
            return Settings(_env_file=None, **values)

    return make
