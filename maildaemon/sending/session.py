"""A pipelined SMTP session's wire: a protocol that reads every reply in order (aiosmtplib's
reader keeps one waiter per reply and drops replies that arrive together), bounded in line
and reply size, and the session state taken over from aiosmtplib after STARTTLS and AUTH."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import cast

import aiosmtplib

from maildaemon.sending.reply import Reply, storable_text
from maildaemon.sending.size import advertised_limit

MAX_LINE = 8192  # RFC 5321 allows 512 per reply line; be generous, but bounded
MAX_REPLY = 4 * MAX_LINE


class LinkLost(Exception):
    """The connection closed; no more replies will come."""


class OutOfStep(Exception):
    """The server sent something that is not an SMTP reply, or replies nobody asked for."""


class ReplyReader(asyncio.Protocol):
    """Owns the transport after EHLO: parses every reply (multi-line, split in any number
    of segments) into a queue, in order."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.failure: Exception | None = None  # why no more replies will come
        self.last_activity = time.monotonic()
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._code = 0
        self._replies: collections.deque[Reply] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        self._buffer += data
        try:
            self._parse()
        except OutOfStep as exc:
            self._fail(exc)
            self.transport.abort()
        self._wake()

    def eof_received(self) -> bool:
        self._fail(LinkLost("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(LinkLost(f"connection lost: {exc}" if exc else "connection closed"))

    # reading

    @property
    def idle(self) -> bool:
        """Nothing received that was not read: no queued reply, no partial one."""
        return not self._replies and not self._buffer and not self._lines

    async def reply(self) -> Reply:
        """The next reply; raises ``LinkLost``/``OutOfStep`` when none will come."""
        while not self._replies:
            if self.failure is not None:
                raise type(self.failure)(str(self.failure))
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._replies.popleft()

    def write(self, data: bytes) -> None:
        if self.failure is not None:
            raise LinkLost(str(self.failure))
        if self.transport.is_closing():
            raise LinkLost("connection closing")
        self.transport.write(data)

    def _parse(self) -> None:
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if len(line) > MAX_LINE:
                raise OutOfStep("reply line too long")
            digits, sep = line[:3], line[3:4]
            if not (digits.isdigit() and b"2" <= digits[:1] <= b"5") or sep not in (
                b" ",
                b"-",
                b"\r",
                b"\n",
            ):
                raise OutOfStep(f"not an SMTP reply: {line[:80]!r}")
            code = int(digits)
            if self._lines and code != self._code:
                raise OutOfStep(f"multi-line reply changes its code: {self._code} then {code}")
            self._code = code
            self._lines.append(line[4:].strip(b" \t\r\n"))
            if sep == b"-":
                if sum(map(len, self._lines)) > MAX_REPLY:
                    raise OutOfStep("reply too long")
                continue
            self._replies.append(Reply(code, storable_text(b"\n".join(self._lines))))
            self._lines = []
        if len(self._buffer) > MAX_LINE:
            raise OutOfStep("reply line too long")

    def _fail(self, exc: Exception) -> None:
        if self.failure is None:
            self.failure = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Session:
    """A connection after STARTTLS, EHLO and AUTH, whose replies ``ReplyReader`` reads."""

    def __init__(
        self, reader: ReplyReader, chunking: bool, size_limit: int | None, dsn: bool = False
    ) -> None:
        self.reader = reader
        self.chunking = chunking
        self.dsn = dsn  # the server offers DSN (RFC 3461): RET/ENVID, NOTIFY/ORCPT may go
        self.size_limit = size_limit  # the server's SIZE (RFC 1870), when it offers it
        self.dirty = False  # a transaction was left half-way: RSET leads the next flight

    @classmethod
    def take_over(cls, client: aiosmtplib.SMTP) -> Session:
        """Detach the transport from aiosmtplib's protocol (one reply per command)."""
        transport = cast(asyncio.Transport, client.transport)
        chunking = client.supports_extension("chunking")
        size_limit = advertised_limit(client.esmtp_extensions)
        dsn = client.supports_extension("dsn")
        reader = ReplyReader(transport)
        transport.set_protocol(reader)
        client.protocol = None
        client.transport = None
        client.close()  # resets aiosmtplib's state; the transport is ours now
        return cls(reader, chunking, size_limit, dsn)

    async def quit(self) -> None:
        try:
            self.reader.write(b"QUIT\r\n")
            async with asyncio.timeout(2):
                await self.reader.reply()
        except (LinkLost, OutOfStep, TimeoutError):
            pass
        finally:
            self.reader.transport.close()
