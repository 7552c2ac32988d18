"""The dev stack's SMTP server protocol: aiosmtpd's ``SMTP`` with the script of
``smtp_script`` applied at every stage, CHUNKING (BDAT, RFC 3030), and replies held
while the client has more commands waiting, so a pipelined flight is answered in one
write ("flight", counted over TLS), as a pipelining server does.

The only test and dev SMTP server of the project (tests/unit/test_architecture.py holds
that; the daemon's own report listener is the one other module that imports aiosmtpd);
``smtp_sink.SmtpSink`` serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from maildaemon.devstack.smtp_script import (
    CLOSE,
    DROP,
    ENDLESS,
    SILENCE,
    SKIP,
    Action,
    Command,
    ReceivedMessage,
    SinkBehaviour,
    is_reply,
)

DEFAULT_DATA_REPLY = "250 2.0.0 OK queued"
ENDLESS_CAP = 64 * 2**20  # an endless reply line stops here if the client never gives up
SPLIT_PAUSE_S = 0.0005  # between the pieces of a split write: each its own segment
# RFC 3461 parameters, taken (and dropped before aiosmtpd sees them) when DSN is offered.
_DSN_MAIL = ("RET=", "ENVID=")
_DSN_RCPT = ("NOTIFY=", "ORCPT=")


def _without(arg: str | None, keys: tuple[str, ...]) -> str | None:
    if arg is None:
        return None
    return " ".join(w for w in arg.split(" ") if not w.upper().startswith(keys))


_STAGE_OF = {"HELO": "ehlo", "EHLO": "ehlo"}  # else the verb in lower case
_URGENT = ("starttls", "quit")  # answered at once: the link changes or ends right after


class Ledger(Protocol):
    """What a connection reads from and records into (``SmtpSink``)."""

    behaviour: SinkBehaviour
    commands: list[Command]
    dropped: list[ReceivedMessage]
    rejected: list[ReceivedMessage]
    flights: int
    endless_written: int

    def opened(self, conn: Connection) -> None: ...

    def closed(self, conn: Connection) -> None: ...

    async def accept(self, message: ReceivedMessage) -> None: ...


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


async def _hang() -> None:
    """Wait until the session ends: ``connection_lost`` (or EOF) cancels the handler."""
    await asyncio.get_running_loop().create_future()


class _Recorder(dict[str, Callable[[str | None], Awaitable[None]]]):
    """aiosmtpd's command table, recording every command line before it is dispatched.

    ``SMTP._handle_client`` looks each command up with ``.get``; a line it does not know
    (message bytes sent where a command belongs) is recorded too, with no argument.
    """

    def __init__(self, conn: Connection, methods: dict[str, Any]) -> None:
        super().__init__(methods)
        self.conn = conn

    def get(self, verb: str, default: Any = None) -> Any:
        method = super().get(verb)
        if method is None:
            self.conn.record(verb, None)
            return default

        async def run(arg: str | None) -> None:
            self.conn.record(verb, arg)
            self.conn.begin(_STAGE_OF.get(verb, verb.lower()))
            await method(arg)

        return run


class Connection(SMTP):
    """One client connection: aiosmtpd's SMTP plus the script, BDAT, and held replies."""

    def __init__(self, sink: Ledger, require_starttls: bool, **kwargs: Any) -> None:
        super().__init__(Handler(sink), **kwargs)
        self.sink = sink
        self.require_tls = require_starttls
        self.accepted = 0
        self.close_after_reply = False
        self._out: list[bytes] = []
        self._stage: str | None = "banner"
        self._resolved = False
        self._action: Action | None = None
        self._chunks = bytearray()
        self._smtp_methods = _Recorder(self, self._smtp_methods)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # not the STARTTLS re-entry
            self.sink.opened(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.sink.closed(self)
        super().connection_lost(error)

    @property
    def tls(self) -> bool:
        """Whether the link is encrypted (after STARTTLS, or from the start)."""
        transport = self.transport
        return transport is not None and transport.get_extra_info("ssl_object") is not None

    # --- the script ------------------------------------------------------------------

    def record(self, verb: str, arg: str | None) -> None:
        self.sink.commands.append(Command(verb, arg, self.tls, time.time()))

    def begin(self, stage: str) -> None:
        """A command of ``stage`` starts: its first reply is the stage's."""
        self._stage, self._resolved, self._action = stage, False, None

    def resolve(self, stage: str, address: str | None = None) -> Action | None:
        """Take the stage's scripted action now (a hook decides by it); ``push`` does it."""
        self._stage, self._resolved = stage, True
        self._action = self.sink.behaviour.take(stage, address)
        return self._action

    async def push(self, status: str | bytes) -> None:
        """Send ``status``, or what the script says in its place, as the stage's reply."""
        stage, self._stage = self._stage, None
        if self._resolved:
            action, self._resolved, self._action = self._action, False, None
        else:
            action = self.sink.behaviour.take(stage) if stage else None
        delay = self.sink.behaviour.delays.get(stage or "", 0.0)
        if delay:
            await self._flush()
            await asyncio.sleep(delay)
        try:
            await self._perform(status if action is None else action, stage in _URGENT)
        except ConnectionError:
            await _hang()

    async def _perform(self, action: Action, urgent: bool) -> None:
        if action == SKIP:
            return
        if action in (DROP, SILENCE, ENDLESS):
            await self._flush()
            if action == ENDLESS:
                await self._endless()
            if action != SILENCE and self.transport is not None:
                cast(asyncio.Transport, self.transport).abort()  # uvloop: no subclass
            await _hang()
        line = action if isinstance(action, bytes) else action.encode("utf-8", "surrogateescape")
        closing = line.endswith(CLOSE.encode())
        self._out.append(line.removesuffix(CLOSE.encode()) + b"\r\n")
        if closing:
            await self._flush()
            await self._read_briefly()
            await self.end_session()
        if urgent or not self._more_input():
            await self._flush()

    def _more_input(self) -> bool:
        """Whether a whole line the client sent is waiting: then its reply comes along."""
        return b"\n" in getattr(self._reader, "_buffer", b"")

    async def _flush(self) -> None:
        data, self._out = b"".join(self._out), []
        if not data or self.transport is None or self.transport.is_closing():
            return
        if self.tls:
            self.sink.flights += 1
        if not self.sink.behaviour.split_writes:
            self._writer.write(data)
        else:
            for i in range(0, len(data), 3):
                if i:  # none after the last: STARTTLS follows its 220 at once
                    await asyncio.sleep(SPLIT_PAUSE_S)
                self._writer.write(data[i : i + 3])
        await self._writer.drain()

    async def _endless(self) -> None:
        self._writer.write(b"250-")
        piece = b"x" * 65536
        while self.sink.endless_written < ENDLESS_CAP:
            self._writer.write(piece)
            await self._writer.drain()
            self.sink.endless_written += len(piece)

    async def _read_briefly(self) -> None:
        """Read what the client already sent before closing: closing a socket with unread
        data resets the connection, and a reset can take the last reply with it before
        the client reads it. (A real server that closes reads its input first, too.)"""
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(0.2):
                while await self._reader.read(65536):
                    pass

    async def end_session(self) -> None:
        """Write what is held, close the link and end the session."""
        await self._flush()
        if self.transport is not None:
            self.transport.close()
        await _hang()

    # --- commands --------------------------------------------------------------------

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        # aiosmtpd's own require_starttls answers without the enhanced status code.
        if self.require_tls and not self.tls:
            await self.push("530 5.7.0 Must issue a STARTTLS command first")
            return
        await super().smtp_MAIL(_without(arg, _DSN_MAIL) if self.sink.behaviour.dsn else arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        await super().smtp_RCPT(_without(arg, _DSN_RCPT) if self.sink.behaviour.dsn else arg)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        action = self.resolve("starttls")
        if action is not None and not is_reply(action, "2"):
            await self.push("")  # refused (or dropped, or silence): no TLS
            return
        await super().smtp_STARTTLS(arg)

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        action = self.resolve("auth")
        if action is not None and not is_reply(action, "2"):
            await self.push("")  # refused before any credentials are checked
            return
        await super().smtp_AUTH(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        assert self.envelope is not None
        if self.envelope.mail_from and not self.envelope.rcpt_tos:
            self._stage = None
            await self.push("554 5.5.1 no valid recipients")
            return
        action = self.resolve("data")
        if action is not None and not is_reply(action, "3"):
            await self.push("")  # DATA refused: what follows are commands again
            return
        await super().smtp_DATA(arg)
        await self._after_transaction()

    @syntax("BDAT <size> [LAST]")
    async def smtp_BDAT(self, arg: str | None) -> None:
        """RFC 3030 chunks; the reply to ``BDAT … LAST`` is the ``end of data`` stage."""
        size, _, last = (arg or "").partition(" ")
        if not self.sink.behaviour.chunking:
            await self.push('500 Error: command "BDAT" not recognized')
            return
        if not size.isdigit() or last.strip().upper() not in ("", "LAST"):
            await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]")
            return
        if self.resolve("bdat") is not None:
            await self.push("")  # answered before the chunk is read: out of step, so
            await self.end_session()  # the session ends
        self._chunks += await self._reader.readexactly(int(size))
        assert self.envelope is not None
        if not self.envelope.mail_from or not self.envelope.rcpt_tos:
            await self.push("554 5.5.1 no valid recipients")
        elif last.strip().upper() != "LAST":
            await self.push("250 2.0.0 chunk received")
            return
        elif self.data_size_limit and len(self._chunks) > self.data_size_limit:
            await self.push("552 5.3.4 message too big")
        else:
            self.envelope.content = self.envelope.original_content = bytes(self._chunks)
            status = await self._call_handler_hook("DATA")
            await self.push(status)
        self._chunks.clear()
        self.envelope = self._create_envelope()  # the transaction is over, as after DATA
        await self._after_transaction()

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        self._chunks.clear()
        await super().smtp_RSET(arg)
        if self.sink.behaviour.one_transaction:
            await self.end_session()

    async def _after_transaction(self) -> None:
        if self.close_after_reply or self.sink.behaviour.one_transaction:
            await self.end_session()  # after the reply has been written


class Handler:
    """aiosmtpd hooks: EHLO's extensions, scripted MAIL, RCPT and end-of-data replies,
    recording, the maildir."""

    def __init__(self, sink: Ledger) -> None:
        self.sink = sink

    async def handle_EHLO(
        self,
        server: Connection,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        behaviour = self.sink.behaviour
        offers = ["PIPELINING"] * behaviour.pipelining + ["CHUNKING"] * behaviour.chunking
        offers += ["DSN"] * behaviour.dsn
        responses[-1:-1] = [f"250-{name}" for name in offers]
        return ["\r\n".join(responses)]  # one reply, so one scripted action replaces it

    async def handle_MAIL(
        self,
        server: Connection,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        reply = server.resolve("mail") or "250 2.1.0 OK"
        if is_reply(reply, "2") or reply == SKIP:
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: Connection,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = server.resolve("rcpt", address) or "250 OK"
        if is_reply(reply, "2") or reply == SKIP:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: Connection, session: Session, envelope: Envelope) -> str:
        sink = self.sink
        message = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content or b"",
            tls=server.tls,
            peer=_peer_text(session.peer),
            received_at=time.time(),
        )
        reply = server.resolve("end of data") or DEFAULT_DATA_REPLY
        if reply == DROP:
            sink.dropped.append(message)
        elif not (is_reply(reply, "2") or reply == SKIP):
            if reply not in (SILENCE, ENDLESS):
                sink.rejected.append(message)
        else:
            await sink.accept(message)
            server.accepted += 1
            every = sink.behaviour.close_after_messages
            server.close_after_reply = bool(every) and server.accepted % (every or 1) == 0
        return DEFAULT_DATA_REPLY
