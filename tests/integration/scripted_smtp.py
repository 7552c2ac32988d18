"""A small scriptable ESMTP server (STARTTLS required, PIPELINING, CHUNKING) for the
pipelining tests, including hostile behaviour no real MTA shows on purpose.

It answers the commands of one received segment in one write (a "flight", counted), or
a few bytes per write when ``split`` is set.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

import trustme


@dataclass
class Script:
    extensions: tuple[str, ...] = ("PIPELINING", "CHUNKING")
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address → reply
    final_reply: str = "250 2.0.0 queued"
    multiline: bool = False  # MAIL, RCPT and end-of-data replies in three lines each
    split: bool = False  # replies written three bytes at a time, each its own TLS record
    extra_reply_after: str | None = None  # "MAIL" or "END": one unrequested 250 follows
    skip_rcpt_reply: bool = False  # RCPT accepted, but not answered
    silent: bool = False  # nothing but EHLO answered once TLS is up
    drop_after_data: bool = False  # the message arrives, the link is cut without a reply


@dataclass
class Received:
    mail_from: str
    rcpts: list[str]
    data: bytes


class _Conn(asyncio.Protocol):
    def __init__(self, server: ScriptedServer) -> None:
        self.server = server
        self.script = server.script
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.tls = False
        self.upgrading = False
        self.mode = "command"  # "data" or "bdat"
        self.bdat_left = 0
        self.bdat_last = False
        self.mail: str | None = None
        self.rcpts: list[str] = []
        self.data = bytearray()
        self.out: list[str] = []
        self.writes: asyncio.Queue[bytes] = asyncio.Queue()
        self.writer: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:
            self.server.connections.append(self)
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.tls:
            transport.write(b"220 scripted ESMTP\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.writer is not None:
            self.writer.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.upgrading:
            return  # processed once the handshake is done
        self._process()
        self._flush()

    def close_with(self, reply: bytes | None) -> None:
        """The server ends the connection on its own (an idle timeout), maybe with a reply."""
        assert self.transport is not None
        if reply:
            self.transport.write(reply)
        self.transport.close()

    def _reply(self, line: str, multiline: bool = False) -> None:
        if multiline and self.script.multiline:
            code = line[:3]
            self.out.extend([f"{code}-first line", f"{code}-second line"])
        self.out.append(line)

    def _flush(self) -> None:
        if not self.out or self.transport is None:
            return
        data = "".join(line + "\r\n" for line in self.out).encode()
        self.out = []
        if self.tls:
            self.server.flights += 1
        if not self.script.split:
            self.transport.write(data)
            return
        for i in range(0, len(data), 3):
            self.writes.put_nowait(data[i : i + 3])
        if self.writer is None:
            self.writer = asyncio.ensure_future(self._trickle())

    async def _trickle(self) -> None:
        while True:
            piece = await self.writes.get()
            if self.transport is None or self.transport.is_closing():
                return
            self.transport.write(piece)
            await asyncio.sleep(0.0005)

    def _process(self) -> None:
        while self.transport is not None and not self.transport.is_closing():
            if self.mode == "data":
                if self.buf.startswith(b".\r\n"):
                    end = 0
                else:
                    end = self.buf.find(b"\r\n.\r\n")
                    if end < 0:
                        return
                    end += 2
                raw = bytes(self.buf[:end])
                del self.buf[: end + 3]
                self.mode = "command"
                self._end_of_data(raw.replace(b"\r\n..", b"\r\n.").removeprefix(b"."))
                continue
            if self.mode == "bdat":
                take = min(self.bdat_left, len(self.buf))
                self.data += self.buf[:take]
                del self.buf[:take]
                self.bdat_left -= take
                self.server.data_bytes += take
                if self.bdat_left:
                    return
                self.mode = "command"
                if not self.rcpts:
                    self._reply("554 5.5.1 no valid recipients")
                elif self.bdat_last:
                    self._end_of_data(bytes(self.data))
                else:
                    self._reply("250 2.0.0 chunk received")
                continue
            nl = self.buf.find(b"\r\n")
            if nl < 0:
                return
            line = bytes(self.buf[:nl]).decode()
            del self.buf[: nl + 2]
            if self.tls:
                self.server.commands.append(line)
            if self.tls and self.script.silent and not line.upper().startswith("EHLO"):
                continue
            self._command(line)
            if self.upgrading:
                return

    def _command(self, line: str) -> None:
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if verb == "EHLO":
            exts = list(self.script.extensions) + ([] if self.tls else ["STARTTLS"])
            lines = ["scripted", *exts, "8BITMIME"]
            self.out.extend(f"250-{x}" for x in lines[:-1])
            self.out.append(f"250 {lines[-1]}")
        elif verb == "STARTTLS":
            self.out.append("220 2.0.0 ready")
            self._flush()
            self.upgrading = True
            self.server.tasks.add(asyncio.ensure_future(self._starttls()))
        elif not self.tls:
            self._reply("530 5.7.0 Must issue a STARTTLS command first")
        elif verb == "MAIL":
            self.mail = arg.partition(":")[2].strip("<>")
            self.rcpts = []
            self.data = bytearray()
            self._reply("250 2.1.0 sender ok", multiline=True)
            if self.script.extra_reply_after == "MAIL":
                self._reply("250 2.0.0 unrequested")
        elif verb == "RCPT":
            addr = arg.partition(":")[2].strip("<>")
            reply = self.script.rcpt_replies.get(addr, "250 2.1.5 recipient ok")
            if self.mail is None:
                reply = "503 5.5.1 MAIL first"
            if reply.startswith("2"):
                self.rcpts.append(addr)
            if not self.script.skip_rcpt_reply:
                self._reply(reply, multiline=True)
        elif verb == "DATA":
            if not self.rcpts:
                self._reply("554 5.5.1 no valid recipients")
            else:
                self.mode = "data"
                self._reply("354 end with <CRLF>.<CRLF>")
        elif verb == "BDAT":
            size, _, last = arg.partition(" ")
            self.mode, self.bdat_left, self.bdat_last = "bdat", int(size), last.upper() == "LAST"
        elif verb in ("RSET", "NOOP"):
            if verb == "RSET":
                self.mail, self.rcpts, self.data = None, [], bytearray()
            self._reply("250 2.0.0 OK")
        elif verb == "QUIT":
            self._reply("221 2.0.0 bye")
            self._flush()
            assert self.transport is not None
            self.transport.close()
        else:
            self._reply("502 5.5.2 not implemented")

    def _end_of_data(self, data: bytes) -> None:
        message = Received(self.mail or "", list(self.rcpts), data)
        self.mail, self.rcpts, self.data = None, [], bytearray()
        if self.script.drop_after_data:
            self.server.dropped.append(message)
            assert self.transport is not None
            self.transport.abort()
            return
        if self.script.final_reply.startswith("2"):
            self.server.received.append(message)
        self._reply(self.script.final_reply, multiline=True)
        if self.script.extra_reply_after == "END":
            self._reply("250 2.0.0 unrequested")

    async def _starttls(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        self.buf.clear()  # plaintext that came with STARTTLS is dropped (RFC 3207)
        self.tls = True
        self.transport = await loop.start_tls(
            self.transport, self, self.server.tls, server_side=True
        )
        self.upgrading = False
        self._process()
        self._flush()


class ScriptedServer:
    def __init__(self, ca: trustme.CA, script: Script | None = None) -> None:
        self.script = script or Script()
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost", "127.0.0.1").configure_cert(self.tls)
        self.received: list[Received] = []
        self.dropped: list[Received] = []
        self.commands: list[str] = []  # every command line received over TLS
        self.connections: list[_Conn] = []
        self.flights = 0  # reply writes over TLS
        self.data_bytes = 0  # BDAT chunk bytes received
        self.port = 0
        self.tasks: set[asyncio.Future[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in self.connections:
                if conn.transport is not None:
                    conn.transport.abort()
            await self._server.wait_closed()

    def transaction_verbs(self) -> list[str]:
        return [c.split(" ", 1)[0].upper() for c in self.commands if not c.startswith("EHLO")]
