"""An SMTP sink with STARTTLS (aiosmtpd + a trustme CA) for the tests, the dev stack and benches.

In-process: ``SmtpSink`` serves in the running asyncio loop; ``SinkBehaviour`` scripts its
replies. As a process (the dev stack)::

    python -m maildaemon.devstack.smtp_sink --dir MAILDIR --port 2525 --cert-dir CERTS
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import itertools
import logging
import os
import shutil
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any

import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

log = logging.getLogger("maildaemon.devstack.smtp_sink")

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
DEFAULT_DATA_REPLY = "250 2.0.0 OK queued"
READY_PREFIX = "smtp_sink ready"


@dataclass
class SinkBehaviour:
    """How the sink answers; change it at any time (STARTTLS and AUTH apply per connection).

    ``require_starttls`` only applies while STARTTLS is offered. ``rcpt_replies`` maps an
    address to a FIFO of reply lines, one consumed per RCPT TO of that address (none left:
    ``250 OK``); ``data_replies`` likewise for the end of DATA. ``drop_after_data`` times,
    the sink reads a whole message and closes the connection without replying.
    ``close_after_messages``: the sink closes a connection after every N accepted messages.
    ``auth``: AUTH PLAIN/LOGIN with these credentials is required (offered after STARTTLS).
    ``pipelining``: EHLO offers PIPELINING (RFC 2920; aiosmtpd reads commands in order).
    """

    offer_starttls: bool = True
    require_starttls: bool = True
    rcpt_replies: dict[str, list[str]] = field(default_factory=dict)
    data_replies: list[str] = field(default_factory=list)
    drop_after_data: int = 0
    close_after_messages: int | None = None
    auth: tuple[str, str] | None = None
    pipelining: bool = False


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the sink received, as it came over the wire."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    peer: str
    received_at: float

    def parse(self) -> EmailMessage:
        """The message parsed with the modern ``email`` policy."""
        return email.message_from_bytes(self.data, policy=email.policy.default)


def _reply_ok(reply: str) -> bool:
    return reply[:1] == "2"


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _credentials_check(credentials: tuple[str, str]) -> Callable[[str, bytes, bytes], bool]:
    expected = (credentials[0].encode(), credentials[1].encode())

    def check(mechanism: str, login: bytes, password: bytes) -> bool:
        return (login, password) == expected

    return check


class _Connection(SMTP):
    """One client connection: aiosmtpd's SMTP plus the sink's STARTTLS and closing rules."""

    def __init__(self, sink: SmtpSink, require_starttls: bool, **kwargs: Any) -> None:
        super().__init__(sink._handler, **kwargs)
        self.sink = sink
        self.require_tls = require_starttls
        self.accepted = 0
        self.close_after_reply = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # not the STARTTLS re-entry
            self.sink._connections.add(self)
            self.sink.connections_opened += 1
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.sink._connections.discard(self)
        super().connection_lost(error)

    @property
    def tls(self) -> bool:
        return self.session is not None and self.session.ssl is not None

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        # aiosmtpd's own require_starttls answers without the enhanced status code.
        if self.require_tls and not self.tls:
            await self.push("530 5.7.0 Must issue a STARTTLS command first")
            return
        await super().smtp_MAIL(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        await super().smtp_DATA(arg)
        if self.close_after_reply and self.transport is not None:
            self.transport.close()  # after the reply has been written

    async def drop(self) -> None:
        """Close the link without a reply; waits to be cancelled by ``connection_lost``."""
        if isinstance(self.transport, asyncio.Transport):
            self.transport.abort()
        await asyncio.get_running_loop().create_future()


class _Handler:
    """aiosmtpd hooks: scripted RCPT and DATA replies, recording, the maildir."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_EHLO(
        self,
        server: _Connection,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.sink.behaviour.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self,
        server: _Connection,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        replies = self.sink.behaviour.rcpt_replies
        queue = replies.get(address) or replies.get(address.lower())
        reply = queue.pop(0) if queue else "250 OK"
        if _reply_ok(reply):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply

    async def handle_DATA(self, server: _Connection, session: Session, envelope: Envelope) -> str:
        sink, behaviour = self.sink, self.sink.behaviour
        message = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content or b"",
            tls=session.ssl is not None,
            peer=_peer_text(session.peer),
            received_at=time.time(),
        )
        if behaviour.drop_after_data > 0:
            behaviour.drop_after_data -= 1
            sink.dropped.append(message)
            await server.drop()
        reply = behaviour.data_replies.pop(0) if behaviour.data_replies else DEFAULT_DATA_REPLY
        if not _reply_ok(reply):
            sink.rejected.append(message)
            return reply
        await sink._accept(message)
        server.accepted += 1
        every = behaviour.close_after_messages
        server.close_after_reply = bool(every) and server.accepted % (every or 1) == 0
        return reply


class SmtpSink:
    """An SMTP server in the running asyncio loop that accepts (or refuses) and records mail.

    STARTTLS uses a certificate for ``localhost`` and ``127.0.0.1`` from ``ca`` (a fresh
    trustme CA by default); clients trust ``ca_file``. With ``maildir`` set, every accepted
    message is also written atomically to ``<maildir>/<timestamp>-<n>.eml``. The CA PEM goes
    to ``cert_dir`` (a temporary directory removed by ``stop()`` when not given).
    """

    def __init__(
        self,
        maildir: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        behaviour: SinkBehaviour | None = None,
        ca: trustme.CA | None = None,
        *,
        cert_dir: Path | None = None,
        hostname: str = "localhost",
    ) -> None:
        self.behaviour = behaviour or SinkBehaviour()
        self.messages: list[ReceivedMessage] = []
        self.dropped: list[ReceivedMessage] = []
        self.rejected: list[ReceivedMessage] = []
        self.connections_opened = 0
        self._maildir = maildir
        self._host = host
        self._requested_port = port
        self._ca = ca or trustme.CA()
        self._cert_dir = cert_dir
        self._own_cert_dir: Path | None = None
        self._hostname = hostname
        self._handler = _Handler(self)
        self._counter = itertools.count(1)
        self._connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._tls: ssl.SSLContext | None = None
        self._changed: asyncio.Condition | None = None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("SmtpSink is not started")
        return self._port

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def maildir(self) -> Path | None:
        """Where accepted messages are written as ``.eml`` files (None: not kept)."""
        return self._maildir

    @property
    def ca(self) -> trustme.CA:
        return self._ca

    @property
    def ca_file(self) -> Path:
        """PEM of the CA a client must trust (written by ``start()``)."""
        cert_dir = self._cert_dir or self._own_cert_dir
        if cert_dir is None:
            raise RuntimeError("SmtpSink is not started")
        return cert_dir / CA_FILE

    async def __aenter__(self) -> SmtpSink:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        if self._cert_dir is None:
            self._own_cert_dir = Path(tempfile.mkdtemp(prefix="maildaemon-sink-"))
        else:
            self._cert_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.ca_file, self._ca.cert_pem.bytes())
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ca.issue_cert("localhost", "127.0.0.1").configure_cert(self._tls)
        if self._maildir is not None:
            self._maildir.mkdir(parents=True, exist_ok=True)
        self._changed = asyncio.Condition()
        self._server = await loop.create_server(self._connection, self._host, self._requested_port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, cut open connections, and wait for their handlers to end."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        connections, self._connections = list(self._connections), set()
        handlers = []
        for conn in connections:
            if isinstance(conn.transport, asyncio.Transport):
                conn.transport.abort()
            if conn._handler_coroutine is not None:
                # What connection_lost() does, done here too: a link cut during the TLS
                # handshake never reaches connection_lost() of the SMTP protocol.
                conn._handler_coroutine.cancel()
                handlers.append(conn._handler_coroutine)
        if handlers:
            await asyncio.wait(handlers, timeout=5)
        await server.wait_closed()
        if self._own_cert_dir is not None:
            shutil.rmtree(self._own_cert_dir, ignore_errors=True)
            self._own_cert_dir = None

    async def wait_for(
        self,
        count: int,
        timeout: float = 10.0,
    ) -> list[ReceivedMessage]:
        """Wait until at least ``count`` messages were accepted; returns all of them."""
        if self._changed is None:
            raise RuntimeError("SmtpSink is not started")
        changed = self._changed
        try:
            async with asyncio.timeout(timeout), changed:
                await changed.wait_for(lambda: len(self.messages) >= count)
        except TimeoutError:
            raise TimeoutError(
                f"the SMTP sink accepted {len(self.messages)} of {count} messages in {timeout}s"
            ) from None
        return list(self.messages)

    def _connection(self) -> _Connection:
        behaviour = self.behaviour
        tls = self._tls if behaviour.offer_starttls else None
        auth = behaviour.auth
        return _Connection(
            self,
            require_starttls=behaviour.require_starttls and tls is not None,
            hostname=self._hostname,
            decode_data=False,
            tls_context=tls,
            auth_required=auth is not None,
            auth_require_tls=True,
            auth_callback=_credentials_check(auth) if auth else None,
            loop=asyncio.get_running_loop(),
        )

    async def _accept(self, message: ReceivedMessage) -> None:
        number = next(self._counter)
        self.messages.append(message)
        if self._maildir is not None:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(message.received_at))
            micros = int(message.received_at % 1 * 1_000_000)
            path = self._maildir / f"{stamp}.{micros:06d}-{number}.eml"
            _write_atomically(path, message.data)
            log.info(
                "smtp_sink_message_received from=%s to=%s bytes=%d file=%s",
                message.mail_from,
                ",".join(message.rcpt_tos),
                len(message.data),
                path.name,
            )
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_or_create_ca(cert_dir: Path) -> trustme.CA:
    """The CA kept in ``cert_dir`` (so clients keep trusting it across restarts), or a new one."""
    cert_path, key_path = cert_dir / CA_FILE, cert_dir / CA_KEY_FILE
    if cert_path.is_file() and key_path.is_file():
        return trustme.CA.from_pem(cert_path.read_bytes(), key_path.read_bytes())
    cert_dir.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="maildaemon dev")
    key_tmp = key_path.with_name(f".{key_path.name}.tmp")
    key_tmp.write_bytes(b"")
    key_tmp.chmod(0o600)
    key_tmp.write_bytes(ca.private_key_pem.bytes())
    os.replace(key_tmp, key_path)
    _write_atomically(cert_path, ca.cert_pem.bytes())
    return ca


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m maildaemon.devstack.smtp_sink",
        description="An SMTP sink with STARTTLS that writes every message to a directory.",
    )
    parser.add_argument("--dir", type=Path, required=True, help="where messages are written")
    parser.add_argument("--cert-dir", type=Path, required=True, help="where the CA PEM goes")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525, help="0 picks a free port")
    parser.add_argument("--auth", metavar="USER:PASSWORD", help="require AUTH after STARTTLS")
    parser.add_argument("--no-require-starttls", action="store_true")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    behaviour = SinkBehaviour(require_starttls=not args.no_require_starttls)
    if args.auth:
        user, _, password = str(args.auth).partition(":")
        behaviour.auth = (user, password)
    sink = SmtpSink(
        args.dir,
        host=args.host,
        port=args.port,
        behaviour=behaviour,
        ca=load_or_create_ca(args.cert_dir),
        cert_dir=args.cert_dir,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await sink.start()
    try:
        print(
            f"{READY_PREFIX} host={sink.host} port={sink.port} "
            f"ca_file={sink.ca_file} maildir={args.dir}",
            flush=True,
        )
        await stop.wait()
    finally:
        await sink.stop()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd: a line per command
    try:
        asyncio.run(_serve(_parse_args(argv)))
    except OSError as exc:
        print(f"smtp_sink: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
