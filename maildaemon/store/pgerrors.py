"""Driver errors translated into the project's own at the store boundary: PostgreSQL out of
reach or read-only (an outage: retry), a statement cancelled (timeout), data refused, any
other PostgreSQL error (``StoreFailed``). Only the conflicts between concurrent
transactions (``RETRYABLE``) pass through untranslated, for the store's callers to retry."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg

from maildaemon.errors import (
    QueryTimeout,
    StoreFailed,
    StoreReadOnly,
    StoreRejected,
    StoreUnavailable,
)
from maildaemon.logs import event

log = logging.getLogger("maildaemon.store")

# Errors that mean "the database is not there right now", as opposed to a bug.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)
# The server answers but will not write: a primary that was demoted in a failover, or a
# standby reached through a stale name. An outage like any other, and the pool's
# connections are recycled so that new ones find the (new) primary.
_READ_ONLY: tuple[type[BaseException], ...] = (asyncpg.exceptions.ReadOnlySQLTransactionError,)
# PostgreSQL refusing what it was given (bad value, a limit, a constraint other than the
# unique ones intake races on): the data's fault, not the database's.
_REFUSED: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.ProgramLimitExceededError,
    asyncpg.exceptions.CheckViolationError,
    asyncpg.exceptions.NotNullViolationError,
    asyncpg.exceptions.CardinalityViolationError,
    UnicodeError,
)
# Conflicts between concurrent transactions: the whole batch is simply tried again.
RETRYABLE: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.UniqueViolationError,
)


@contextlib.asynccontextmanager
async def translate_errors(what: str, pool: asyncpg.Pool | None = None) -> AsyncIterator[None]:
    try:
        yield
    except asyncpg.exceptions.QueryCanceledError as exc:
        # A statement timeout (the operator API's pool sets one) or a cancel by an admin.
        raise QueryTimeout(f"{what}: the query was cancelled: {exc}") from exc
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(f"{what}: PostgreSQL unavailable: {exc!r}") from exc
    except _READ_ONLY as exc:
        if pool is not None:
            # Idle connections close now, busy ones when released: the next ones are new.
            await pool.expire_connections()
        event(
            log,
            "postgres read-only, connections recycled",
            logging.WARNING,
            operation=what,
            error=str(exc),
        )
        raise StoreReadOnly(f"{what}: PostgreSQL is read-only (failover?): {exc}") from exc
    except _REFUSED as exc:
        raise StoreRejected(f"{what}: PostgreSQL refused the data: {exc}") from exc
    except RETRYABLE:
        raise
    except asyncpg.PostgresError as exc:
        raise StoreFailed(f"{what}: PostgreSQL error {type(exc).__name__}: {exc}") from exc
