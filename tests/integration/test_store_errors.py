"""Driver errors end at the store: every PostgreSQL error leaves it as a project error
(``maildaemon.errors``), except the conflicts its callers retry (``RETRYABLE``); the CLI,
which never sees asyncpg, reports them in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from maildaemon.cli import main as cli
from maildaemon.devstack.postgres import database_dsn
from maildaemon.errors import StoreFailed
from maildaemon.store.pipeline.db import RETRYABLE, Store, translate_errors

REPO = Path(__file__).resolve().parents[2]


async def test_an_error_of_no_family_is_store_failed(pg_dsn: str) -> None:
    store = await Store.open(pg_dsn, min_size=1, max_size=1)
    try:
        with pytest.raises(StoreFailed) as info:
            async with translate_errors("probe", store.pool):
                await store.pool.fetch("SELECT * FROM mail.no_such_table")
        assert "probe: PostgreSQL error UndefinedTableError" in str(info.value)
        with pytest.raises(StoreFailed) as info:  # a bug: not an outage, not the data
            async with translate_errors("probe", store.pool):
                await store.pool.execute("SELEKT 1")
        assert "PostgresSyntaxError" in str(info.value)
    finally:
        await store.close()


async def test_conflicts_stay_retryable(pg_dsn: str) -> None:
    store = await Store.open(pg_dsn, min_size=1, max_size=1)
    try:
        await store.pool.execute("CREATE TABLE public.once (k int PRIMARY KEY)")
        await store.pool.execute("INSERT INTO public.once VALUES (1)")
        with pytest.raises(RETRYABLE):
            async with translate_errors("probe", store.pool):
                await store.pool.execute("INSERT INTO public.once VALUES (1)")
    finally:
        await store.close()


async def test_a_refused_login_is_store_failed(pg_server: str) -> None:
    with pytest.raises(StoreFailed) as info:
        await Store.open(database_dsn(pg_server, "no_such_database"), min_size=1, max_size=1)
    assert "open pool" in str(info.value) and "no_such_database" in str(info.value)


def test_the_cli_reports_a_store_error_in_one_line(
    pg_server: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("MAIL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MAIL_POSTGRES_PRIMARY_DSN", database_dsn(pg_server, "no_such_database"))
    monkeypatch.setenv("MAIL_SMTP_MODE", "stub")
    monkeypatch.setenv("MAIL_TEMPLATE_DIR", str(REPO / "templates"))
    code = cli.main(["deliveries", "show", "d-1"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("maildaemon: open pool: PostgreSQL error ") and err.count("\n") == 1
    assert "Traceback" not in err
