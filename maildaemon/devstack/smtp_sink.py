"""An SMTP sink with STARTTLS (a trustme CA) for the tests, the dev stack and benches.

In-process: ``SmtpSink`` serves the one SMTP server (``smtp_server``, aiosmtpd) in the
running asyncio loop; ``SinkBehaviour`` (``smtp_script``) says what it offers and
scripts its replies, stage by stage. As a process (the dev stack)::

    python -m maildaemon.devstack.smtp_sink --dir MAILDIR --port 2525 --cert-dir CERTS
"""

from __future__ import annotations

import argparse
import asyncio
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
from pathlib import Path
from types import TracebackType
from typing import cast

import trustme

from maildaemon.devstack.late_reports import LateReporter
from maildaemon.devstack.smtp_script import Command, ReceivedMessage, SinkBehaviour
from maildaemon.devstack.smtp_server import Connection

__all__ = [
    "CA_FILE",
    "READY_PREFIX",
    "ReceivedMessage",
    "SinkBehaviour",
    "SmtpSink",
    "load_or_create_ca",
    "main",
]

log = logging.getLogger("maildaemon.devstack.smtp_sink")

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
READY_PREFIX = "smtp_sink ready"


def _credentials_check(credentials: tuple[str, str]) -> Callable[[str, bytes, bytes], bool]:
    expected = (credentials[0].encode(), credentials[1].encode())

    def check(mechanism: str, login: bytes, password: bytes) -> bool:
        return (login, password) == expected

    return check


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
        implicit_tls: bool = False,
        on_accept: Callable[[ReceivedMessage], None] | None = None,
    ) -> None:
        self.behaviour = behaviour or SinkBehaviour()
        # Told of every accepted message (the dev stack's late reports: late_reports).
        self.on_accept = on_accept
        self.messages: list[ReceivedMessage] = []
        self.dropped: list[ReceivedMessage] = []
        self.rejected: list[ReceivedMessage] = []
        self.connections_opened = 0
        self.commands: list[Command] = []  # every command line read, in order
        self.flights = 0  # reply writes over TLS
        self.endless_written = 0  # bytes of ENDLESS reply lines the clients took
        self._maildir = maildir
        self._host = host
        self._requested_port = port
        self._ca = ca or trustme.CA()
        self._cert_dir = cert_dir
        self._own_cert_dir: Path | None = None
        self._hostname = hostname
        self._implicit_tls = implicit_tls  # TLS from the first byte (port 465), no STARTTLS
        self._counter = itertools.count(1)
        self._connections: set[Connection] = set()
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
        self._server = await loop.create_server(
            self._connection,
            self._host,
            self._requested_port,
            ssl=self._tls if self._implicit_tls else None,
        )
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
            if conn.transport is not None:
                cast(asyncio.Transport, conn.transport).abort()  # uvloop: no subclass
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

    def transaction_verbs(self) -> list[str]:
        """The verbs read over TLS, EHLO left out (``FROM:`` and the like: message bytes
        where a command belongs)."""
        return [c.verb for c in self.commands if c.tls and c.verb not in ("EHLO", "HELO")]

    def close_connections(self, reply: str | None = None) -> None:
        """Close every open connection now (an idle timeout), with ``reply`` first if given."""
        for conn in list(self._connections):
            if conn.transport is not None and not conn.transport.is_closing():
                if reply is not None:
                    cast(asyncio.Transport, conn.transport).write(reply.encode() + b"\r\n")
                conn.transport.close()

    def _connection(self) -> Connection:
        behaviour = self.behaviour
        tls = self._tls if behaviour.offer_starttls and not self._implicit_tls else None
        auth = behaviour.auth
        return Connection(
            self,
            require_starttls=behaviour.require_starttls and tls is not None,
            hostname=self._hostname,
            decode_data=False,
            data_size_limit=behaviour.size,
            tls_context=tls,
            auth_required=auth is not None,
            auth_require_tls=True,
            auth_exclude_mechanism=["LOGIN"],  # PLAIN alone: a scripted refusal is final
            auth_callback=_credentials_check(auth) if auth else None,
            loop=asyncio.get_running_loop(),
        )

    def opened(self, conn: Connection) -> None:
        self._connections.add(conn)
        self.connections_opened += 1

    def closed(self, conn: Connection) -> None:
        self._connections.discard(conn)

    async def accept(self, message: ReceivedMessage) -> None:
        number = next(self._counter)
        self.messages.append(message)
        if self.on_accept is not None:
            self.on_accept(message)
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
    parser.add_argument(
        "--report-to",
        metavar="HOST:PORT",
        help="act as a relay that reports later: mail to bounce@, delay@ and complaint@ "
        "addresses is answered with a DSN or ARF report sent to this report listener",
    )
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    behaviour = SinkBehaviour(require_starttls=not args.no_require_starttls)
    if args.auth:
        user, _, password = str(args.auth).partition(":")
        behaviour.auth = (user, password)
    reporter = None
    if args.report_to:
        host, _, port = str(args.report_to).rpartition(":")
        reporter = LateReporter(host, int(port))
    sink = SmtpSink(
        args.dir,
        host=args.host,
        port=args.port,
        behaviour=behaviour,
        ca=load_or_create_ca(args.cert_dir),
        cert_dir=args.cert_dir,
        on_accept=reporter,
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
        if reporter is not None:
            await reporter.close()


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
