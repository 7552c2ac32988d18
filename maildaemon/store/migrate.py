"""Schema migrations (yoyo, SQL files in ``migrations/``), safe when replicas start together."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import psycopg
from yoyo import get_backend, read_migrations

from maildaemon.errors import StartupError
from maildaemon.store.pipeline.db import Store

log = logging.getLogger("maildaemon.migrate")

# pg_advisory_lock key shared by every replica: "maildaemon" folded into a bigint.
_LOCK_KEY = 0x6D61696C64616D6E


def migrations_dir() -> Path:
    """The migrations shipped with the package (``maildaemon/migrations`` links to the
    top-level ``migrations/`` in a checkout; a built wheel carries the files themselves)."""
    here = Path(__file__).resolve().parent.parent / "migrations"
    if here.is_dir():
        return here
    cwd = Path.cwd() / "migrations"
    if cwd.is_dir():
        return cwd
    raise StartupError("migrations folder not found (looked next to the package and in the cwd)")


def _yoyo_uri(dsn: str) -> str:
    _scheme, sep, rest = dsn.partition("://")
    if not sep:
        raise StartupError("MAIL_POSTGRES_PRIMARY_DSN is not a URL")
    joiner = "&" if "?" in rest else "?"
    # yoyo's own bookkeeping tables live in schema `mail` beside ours.
    return f"postgresql+psycopg://{rest}{joiner}options=-csearch_path%3Dmail"


def apply_migrations(dsn: str, folder: Path | None = None) -> list[str]:
    """Apply every pending migration; returns the ids applied. Blocking: run in a thread."""
    folder = folder or migrations_dir()
    try:
        # One replica migrates at a time; the others wait, then find nothing to do. The
        # lock is held by an open transaction (not a session), which also holds behind
        # PgBouncer in transaction pooling: the transaction keeps its server connection.
        with psycopg.connect(dsn, autocommit=False, prepare_threshold=None) as lock_conn:
            lock_conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
                conn.execute("CREATE SCHEMA IF NOT EXISTS mail")
            backend = get_backend(_yoyo_uri(dsn))
            try:
                migrations = read_migrations(str(folder))
                with backend.lock():
                    pending = backend.to_apply(migrations)
                    backend.apply_migrations(pending)
                return [m.id for m in pending]
            finally:
                backend.connection.close()
                lock_conn.rollback()  # ends the transaction: the lock is released
    except psycopg.Error as exc:
        raise StartupError(f"migrations failed: {exc}".strip()) from None


def migration_ids(folder: Path | None = None) -> list[str]:
    """The ids of the migrations shipped (read from the files, no database)."""
    return [m.id for m in read_migrations(str(folder or migrations_dir()))]


def pending_migrations(dsn: str, folder: Path | None = None) -> list[str]:
    """Ids of migrations not yet applied (for readiness). Blocking: run in a thread."""
    folder = folder or migrations_dir()
    backend = get_backend(_yoyo_uri(dsn))
    try:
        return [m.id for m in backend.to_apply(read_migrations(str(folder)))]
    finally:
        backend.connection.close()


async def migrate_or_check(store: Store, dsn: str, *, session: bool) -> list[str]:
    """Apply the migrations on a session; without one (behind PgBouncer and no direct DSN)
    only check that someone did: yoyo needs a session for its search_path and locks."""
    if session:
        return await asyncio.to_thread(apply_migrations, dsn)
    applied = await store.applied_migrations()
    missing = [m for m in await asyncio.to_thread(migration_ids) if m not in applied]
    if missing:
        raise StartupError(
            f"not applied: {', '.join(missing)}; behind PgBouncer migrations need a "
            "direct session: set MAIL_POSTGRES_LISTEN_DSN, or run `maildaemon migrate` "
            "with a direct MAIL_POSTGRES_PRIMARY_DSN first"
        )
    return []
