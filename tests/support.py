"""Helpers shared by the integration tests: run the real daemon in-process, feed the stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from maildaemon import redisconn
from maildaemon.app import App
from maildaemon.config import Settings
from maildaemon.config_values import split_host_port
from maildaemon.contract.command import DeliveryCommand
from maildaemon.contract.parsing import parse_command
from maildaemon.delivery import IntakeEntry
from maildaemon.store.pipeline.db import Store


@contextlib.asynccontextmanager
async def running_app(
    settings: Settings, *, ready_timeout: float = 20.0, dev_maildir: Path | None = None
) -> AsyncIterator[App]:
    """Start the daemon in this loop; stop it (as SIGTERM would) when the block ends."""
    app = App(settings, dev_maildir=dev_maildir)
    task = asyncio.create_task(app.run())
    try:
        deadline = time.monotonic() + ready_timeout
        while not app.readiness.workers_running:
            if task.done():
                task.result()  # raises the startup error
                raise AssertionError("the daemon exited during startup")
            if time.monotonic() > deadline:
                raise AssertionError("the daemon did not become ready")
            await asyncio.sleep(0.02)
        yield app
    finally:
        app.request_stop()
        code = await asyncio.wait_for(task, settings.shutdown_timeout + 15)
        assert code == 0, f"daemon exit code {code}"


def redis_client(addr: str) -> aioredis.Redis:
    host, port = split_host_port(addr, 6379)
    return aioredis.Redis(host=host, port=port)


def command(delivery_id: str, **fields: Any) -> dict[str, Any]:
    """A valid template command; override any field."""
    doc: dict[str, Any] = {
        "delivery_id": delivery_id,
        "source": "authsession",
        "idempotency_key": f"key-{delivery_id}",
        "to": [{"address": "alice@example.com", "name": "Alice Ämmerle"}],
        "payload_mode": "template",
        "template_id": "signin_code",
        "locale": "en",
        "variables": {"code": "493817", "expires_minutes": 10},
    }
    doc.update(fields)
    return {k: v for k, v in doc.items() if v is not None}


async def xadd(settings: Settings, *docs: dict[str, Any] | str | bytes) -> list[str]:
    """XADD each document (a dict becomes the `command` JSON) and return the entry ids."""
    client = redisconn.redis_client(settings)  # TLS and Sentinel as the daemon sees them
    try:
        ids = []
        for doc in docs:
            value = json.dumps(doc) if isinstance(doc, dict) else doc
            ids.append((await client.xadd(settings.command_stream, {"command": value})).decode())
        return ids
    finally:
        await client.aclose()


async def wait_for(
    check: Callable[[], Awaitable[Any]], timeout: float = 15.0, interval: float = 0.05
) -> Any:
    """Poll ``check`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {value!r})")
        await asyncio.sleep(interval)


async def ingest_one(store: Store, doc: dict[str, Any]) -> None:
    """Take one command in directly (no stream), as the consumer would."""
    parsed = parse_command(json.dumps(doc), None)
    assert isinstance(parsed, DeliveryCommand), parsed
    result = await store.ingest([IntakeEntry("0-1", parsed, None, "")], 3600)
    assert len(result.created) == 1


class Db:
    """Read-only views of the state, for assertions."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def fetchval(self, sql: str, *args: Any) -> Any:
        conn = await asyncpg.connect(self.dsn)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    async def status(self, delivery_id: str) -> str | None:
        value: str | None = await self.fetchval(
            "SELECT status FROM mail.deliveries WHERE delivery_id = $1", delivery_id
        )
        return value

    async def wait_status(self, delivery_id: str, *statuses: str, timeout: float = 15.0) -> str:
        async def check() -> str | None:
            status = await self.status(delivery_id)
            return status if status in statuses else None

        result: str = await wait_for(check, timeout)
        return result

    async def attempts(self, delivery_id: str) -> list[asyncpg.Record]:
        return await self.fetch(
            "SELECT * FROM mail.attempts WHERE delivery_id = $1 ORDER BY attempt_no", delivery_id
        )

    async def finished_attempts(self, delivery_id: str) -> list[asyncpg.Record]:
        """Attempts with their result (not the ones on record as `started`)."""
        return await self.fetch(
            "SELECT * FROM mail.attempts WHERE delivery_id = $1 AND status <> 'started' "
            "ORDER BY attempt_no",
            delivery_id,
        )


class TcpProxy:
    """A TCP relay that a test can cut and restore, to take a server 'down'.

    :meth:`lose_reply_to` arms a one-shot fault: the request holding a marker reaches the
    server whole, the server's reply is withheld and the client's link cut as soon as the
    server answers (so the server has done the work, and the client never hears of it)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._marker: bytes | None = None
        self.replies_lost = 0
        self.port = 0
        self._cuts = 0  # a connection being set up when a cut came must not survive it

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port or self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def lose_reply_to(self, marker: bytes) -> None:
        self._marker = marker

    async def cut(self) -> None:
        """Close the listener and every relayed connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._cuts += 1
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cuts = self._cuts
        if self._server is None:  # accepted just before a cut, handled just after it
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        if cuts != self._cuts:  # cut while this connection was being set up
            up_writer.close()
            writer.close()
            return
        self._writers.update({writer, up_writer})
        losing = asyncio.Event()  # the marked request went up: its reply must not come down

        async def up() -> None:
            try:
                while data := await reader.read(65536):
                    if self._marker is not None and self._marker in data:
                        self._marker = None
                        losing.set()
                    up_writer.write(data)
                    await up_writer.drain()
                    if losing.is_set():
                        return
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                if not losing.is_set():
                    up_writer.close()

        async def down() -> None:
            try:
                while data := await up_reader.read(65536):
                    if losing.is_set():  # the server answered: it did the work; cut both
                        self.replies_lost += 1
                        break
                    writer.write(data)
                    await writer.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                writer.close()
                up_writer.close()

        await asyncio.gather(up(), down())
        self._writers.difference_update({writer, up_writer})
