"""A dedicated PostgreSQL connection that LISTENs, for the scheduler's wake-ups."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg

from maildaemon.store.pgerrors import _UNAVAILABLE, translate_errors


@contextlib.asynccontextmanager
async def listen(
    pool: asyncpg.Pool,
    channel: str,
    callback: Callable[[], None],
    dsn: str | None = None,
    ignore: str | None = None,
) -> AsyncIterator[asyncio.Event]:
    """LISTEN on a dedicated connection for as long as the context is open: one of the
    pool's, or with ``dsn`` a direct session of its own (behind PgBouncer in
    transaction pooling a LISTEN is lost with its server connection).

    Yields an event that is set when the connection is lost (the server restarted, the
    backend was terminated): the caller then leaves the block and listens again. A
    notification whose payload is ``ignore`` is not passed on."""
    async with translate_errors("listen"):
        conn: Any = (
            await asyncpg.connect(
                dsn, timeout=10, server_settings={"application_name": "maildaemon-listen"}
            )
            if dsn is not None
            else await pool.acquire()
        )
    lost = asyncio.Event()

    def _on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if ignore is None or payload != ignore:
            callback()

    def _on_lost(*_: Any) -> None:
        lost.set()

    async def unlisten() -> None:
        with contextlib.suppress(*_UNAVAILABLE):  # a lost connection is detached already
            await conn.remove_listener(channel, _on_notify)
            conn.remove_termination_listener(_on_lost)
        with contextlib.suppress(*_UNAVAILABLE):
            if dsn is not None:
                await conn.close(timeout=5)
            else:
                await pool.release(conn)

    try:
        async with translate_errors("listen"):
            conn.add_termination_listener(_on_lost)
            await conn.add_listener(channel, _on_notify)
        yield lost
    finally:
        # Shielded: a cancel arriving meanwhile must not keep the connection checked out
        # (the pool would then wait for it forever when it closes).
        await asyncio.shield(unlisten())
