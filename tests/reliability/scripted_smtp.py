"""A small SMTP server with STARTTLS whose every reply can be scripted, for the reply matrix.

Each stage — ``banner``, ``ehlo``, ``starttls``, ``auth``, ``mail``, ``rcpt``, ``data``,
``end of data`` — has a FIFO of actions; an action is a reply line (``"421 4.3.2 busy"``,
or bytes sent as they are, 8-bit or not), a reply line ending in ``CLOSE`` (the reply, then
the server closes the link, as a server does after a 421 or when it gives up on a client),
``"drop"`` (close the link without a reply), ``"silence"`` (never answer; the link stays
open until the client gives up) or ``"endless"`` (a reply line that never ends). RCPT
actions can also be keyed by address. With nothing scripted a stage answers normally.
``bdat`` answers ``BDAT`` before its chunk is read, as a server refusing it outright does.
Every connection serves one transaction and is then closed, so each message starts from a
fresh session and scripts apply deterministically.

``pipelining``, ``chunking`` (BDAT, RFC 3030; its ``end of data`` is the reply to
``BDAT … LAST``) and ``size`` (RFC 1870) choose what EHLO offers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trustme

CLOSE = " +close"  # suffix of a reply line: the server closes the link after sending it
STAGES = ("banner", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "bdat", "end of data")
_DEFAULTS = {
    "banner": "220 scripted.test ESMTP",
    "starttls": "220 2.0.0 ready to start TLS",
    "auth": "235 2.7.0 authenticated",
    "mail": "250 2.1.0 sender ok",
    "rcpt": "250 2.1.5 recipient ok",
    "data": "354 end data with <CR><LF>.<CR><LF>",
    "end of data": "250 2.0.0 queued as scripted",
}


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


Action = str | bytes


@dataclass
class Script:
    stages: dict[str, list[Action]] = field(default_factory=dict)
    rcpt: dict[str, list[Action]] = field(default_factory=dict)  # per address

    def take(self, stage: str, address: str | None = None) -> Action | None:
        if address is not None and self.rcpt.get(address):
            return self.rcpt[address].pop(0)
        queue = self.stages.get(stage)
        return queue.pop(0) if queue else None

    def clear(self) -> None:
        self.stages.clear()
        self.rcpt.clear()


class _Closed(Exception):
    """The scripted action ended the session."""


class _ClosedAfterReply(Exception):
    """The scripted action sent its reply, then ended the session."""


class ScriptedSmtp:
    def __init__(self, ca: trustme.CA, auth: tuple[str, str] | None = None) -> None:
        self.script = Script()
        self.received: list[Received] = []
        self.connections = 0
        self.data_delay = 0.0  # seconds before the reply to the end of data (a slow server)
        self.mail_times: list[float] = []  # time.time() of every MAIL FROM received
        self.mail_args: list[str] = []  # the argument of every MAIL command received
        self.pipelining = True
        self.chunking = False
        self.size: int | None = None  # SIZE offered in EHLO, with this limit
        self.endless_written = 0  # bytes of the "endless" reply line the client took
        self._ca = ca
        self._auth = auth
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._dir = Path(tempfile.mkdtemp(prefix="scripted-smtp-"))
        self.ca_file = self._dir / "ca.pem"
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost", "127.0.0.1").configure_cert(self._tls)
        self.port = 0

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.ca_file.write_bytes(self._ca.cert_pem.bytes())
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            try:
                await _Session(self, reader, writer).run()
            except _ClosedAfterReply:
                await _drain_briefly(reader)
            writer.close()  # the last reply is flushed first
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 2)
        except (_Closed, OSError, ssl.SSLError, asyncio.IncompleteReadError):
            writer.transport.abort()
        finally:
            self._tasks.discard(task)

    # --- used by the session ---------------------------------------------------------

    def tls_context(self) -> ssl.SSLContext:
        return self._tls

    def credentials_ok(self, blob: str) -> bool:
        if self._auth is None:
            return True
        with contextlib.suppress(ValueError):
            _, user, password = base64.b64decode(blob).decode().split("\0")
            return (user, password) == self._auth
        return False

    @property
    def offers_auth(self) -> bool:
        return self._auth is not None


class _Session:
    def __init__(
        self, server: ScriptedSmtp, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server, self.reader, self.writer = server, reader, writer
        self.tls = False
        self.mail_from: str | None = None
        self.rcpts: list[str] = []

    async def act(self, stage: str, default: str, address: str | None = None) -> str:
        """Carry out the scripted action for ``stage``; returns the reply line sent."""
        action = self.server.script.take(stage, address) or default
        if action == "drop":
            raise _Closed
        if action == "silence":
            await self.reader.read()  # until the client hangs up
            raise _Closed
        if action == "endless":
            await self.endless()
        line = action if isinstance(action, bytes) else action.encode()
        closing = line.endswith(CLOSE.encode())
        self.writer.write(line.removesuffix(CLOSE.encode()) + b"\r\n")
        await self.writer.drain()
        if closing:
            raise _ClosedAfterReply
        return line.decode("utf-8", "replace")

    async def run(self) -> None:
        await self.act("banner", _DEFAULTS["banner"])
        while True:
            line = await self.reader.readline()
            if not line:
                return
            verb, _, arg = line.decode("utf-8", "replace").strip().partition(" ")
            if await self.command(verb.upper(), arg):
                return

    async def command(self, verb: str, arg: str) -> bool:
        """Answer one command; True when the session is over."""
        if verb in ("EHLO", "HELO"):
            await self.act("ehlo", self.ehlo_reply())
        elif verb == "STARTTLS":
            reply = await self.act("starttls", _DEFAULTS["starttls"])
            if reply.startswith("2"):
                await self.writer.start_tls(self.server.tls_context())
                self.tls = True
        elif verb == "AUTH":
            blob = arg.split(" ", 1)[1] if " " in arg else ""
            ok = self.server.credentials_ok(blob)
            await self.act("auth", _DEFAULTS["auth"] if ok else "535 5.7.8 bad credentials")
        elif verb == "MAIL":
            self.server.mail_times.append(time.time())
            self.server.mail_args.append(arg)
            if not self.tls:
                await self.act("mail", "530 5.7.0 must issue STARTTLS first")
                return False
            if (await self.act("mail", _DEFAULTS["mail"])).startswith("2"):
                self.mail_from, self.rcpts = _address(arg), []
        elif verb == "RCPT":
            address = _address(arg)
            default = _DEFAULTS["rcpt"] if self.mail_from is not None else "503 5.5.1 MAIL first"
            if (await self.act("rcpt", default, address)).startswith("2"):
                self.rcpts.append(address)
        elif verb == "BDAT" and self.server.chunking:
            return await self.chunk(arg)
        elif verb == "DATA" and not self.rcpts:
            await self.act("other", "554 5.5.1 no valid recipients")
        elif verb == "DATA":
            if (await self.act("data", _DEFAULTS["data"])).startswith("3"):
                return await self.message()
        elif verb == "RSET":
            await self.act("rset", "250 2.0.0 reset")
            return True  # one transaction per connection
        elif verb == "QUIT":
            await self.act("quit", "221 2.0.0 bye")
            return True
        else:
            await self.act("other", "250 2.0.0 ok")
        return False

    def ehlo_reply(self) -> str:
        lines = ["scripted.test", "8BITMIME"]
        lines += ["PIPELINING"] if self.server.pipelining else []
        lines += ["CHUNKING"] if self.server.chunking else []
        lines += [f"SIZE {self.server.size}"] if self.server.size is not None else []
        if not self.tls:
            lines.append("STARTTLS")
        elif self.server.offers_auth:
            lines.append("AUTH PLAIN")
        return "\r\n".join(
            f"250{'-' if i < len(lines) - 1 else ' '}{text}" for i, text in enumerate(lines)
        )

    async def endless(self) -> None:
        """A reply line that never ends: written until the client cuts the link (or 64 MB)."""
        self.writer.write(b"250-")
        piece = b"x" * 65536
        while self.server.endless_written < 64 * 2**20:
            self.writer.write(piece)
            await self.writer.drain()
            self.server.endless_written += len(piece)
        raise _Closed

    async def chunk(self, arg: str) -> bool:
        """``BDAT <size> LAST``: the whole message in one chunk (what the daemon sends)."""
        size, _, last = arg.partition(" ")
        if self.server.script.stages.get("bdat"):  # answered before the chunk is read
            await self.act("bdat", "")
            return True
        data = await self.reader.readexactly(int(size))
        if not self.rcpts:
            await self.act("other", "554 5.5.1 no valid recipients")
            return True
        if last.strip().upper() != "LAST":
            await self.act("other", "250 2.0.0 chunk received")
            return False
        reply = await self.act("end of data", _DEFAULTS["end of data"])
        if reply.startswith("2"):
            self.server.received.append(Received(self.mail_from or "", tuple(self.rcpts), data))
        return True  # one transaction per connection

    async def message(self) -> bool:
        chunks: list[bytes] = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise _Closed
            if line == b".\r\n":
                break
            chunks.append(line[1:] if line.startswith(b"..") else line)
        if self.server.data_delay:
            await asyncio.sleep(self.server.data_delay)
        reply = await self.act("end of data", _DEFAULTS["end of data"])
        if reply.startswith("2"):
            self.server.received.append(
                Received(self.mail_from or "", tuple(self.rcpts), b"".join(chunks))
            )
        return True  # one transaction per connection


async def _drain_briefly(reader: asyncio.StreamReader) -> None:
    """Read what the client already sent before closing: closing a socket with unread data
    resets the connection, and a reset can take the last reply with it before the client
    reads it. (A real server that closes reads its input first, or lingers, too.)"""
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
        async with asyncio.timeout(0.2):
            while await reader.read(65536):
                pass


def _address(arg: str) -> str:
    start, end = arg.find("<"), arg.find(">")
    return arg[start + 1 : end] if 0 <= start < end else arg.split(":", 1)[-1].strip()
