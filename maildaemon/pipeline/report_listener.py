"""The report listener: an SMTP server in the daemon for bounces, complaints and delays.

Enabled by ``MAIL_BOUNCE_LISTEN_ADDR``; supervised like every component (``run()`` until
``stop()``). It is no relay: RCPT is accepted only for the bounce domain's own addresses
(``bounces+<token>@<MAIL_BOUNCE_DOMAIN>``, and its bare ``bounces@``), every other
recipient gets 550. A report is answered 250 only once it is committed (raw, with what it
was matched to and did: ``pipeline.reports``); 451 when PostgreSQL is down, so the sender
retries. Bounds: ``MAIL_BOUNCE_MAX_BYTES`` (SIZE offered; more is 552),
``MAIL_BOUNCE_MAX_CONNECTIONS`` (beyond: 421 and closed), ``MAIL_BOUNCE_SESSION_TIMEOUT``
(idle per command; a session lasts at most ``SESSION_TIMEOUTS`` of them), ``MAX_RCPTS``
recipients per transaction, ``MAX_REFUSED_RCPTS`` refused ones per session, and at most
``WRITERS`` reports written at a time on the daemon's pool, so a flood cannot take the
connections the result writer needs. STARTTLS is offered when
``MAIL_BOUNCE_TLS_CERT_FILE`` and ``..._KEY_FILE`` are set. This module and
``devstack/smtp_server`` are the project's SMTP servers (tests/unit/test_architecture.py).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from maildaemon.config import Settings
from maildaemon.errors import MailDaemonError, StoreUnavailable
from maildaemon.logs import event
from maildaemon.pipeline.lifecycle import Lifecycle
from maildaemon.pipeline.reports import ReportIntake
from maildaemon.reports.model import Incoming
from maildaemon.returnpath import ReturnPath
from maildaemon.returnpath import from_settings as return_path_of
from maildaemon.store.pipeline.db import Store
from maildaemon.store.reports.db import ReportStore
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.report_listener")
WRITERS = 2
_TOO_MANY = b"421 4.3.2 Too many connections, try again later\r\n"
# Per transaction: RFC 5321 (4.5.3.1.8) asks a server to take at least 100 recipients; a
# report has one. More is 452, and the envelope stays bounded.
MAX_RCPTS = 100
# Per session: recipients refused (not ours) before the connection is closed (421), so a
# client probing for a relay cannot make the daemon log one line per address for ever.
MAX_REFUSED_RCPTS = 10
# A session lasts at most this many idle timeouts (MAIL_BOUNCE_SESSION_TIMEOUT, 10 minutes
# by default), however busy: a client that sends a NOOP just before each timeout cannot
# hold one of the MAIL_BOUNCE_MAX_CONNECTIONS slots for good.
SESSION_TIMEOUTS = 10


class _Refused(asyncio.Protocol):
    """A connection beyond the bound: told so and closed, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_TOO_MANY)
        transport.close()


class _Handler:
    """aiosmtpd hooks: RCPT for our domain only, DATA recorded before 250."""

    def __init__(self, listener: ReportListener) -> None:
        self._l = listener

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not self._l.rp.owns(address):
            self._l.refused("relay", peer=str(session.peer), address=address[:200])
            if isinstance(server, _Session) and server.refused_rcpt():
                return "421 4.7.0 Too many refused recipients, closing"
            return "550 5.7.1 Relaying denied: this server takes reports for its own domain only"
        if len(envelope.rcpt_tos) >= MAX_RCPTS:
            self._l.refused("recipients", peer=str(session.peer))
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        incoming = Incoming(
            raw, "listener", envelope.mail_from, tuple(envelope.rcpt_tos), len(raw), False
        )
        try:
            async with self._l.writers:
                record = await self._l.intake.take(incoming)
        except StoreUnavailable as exc:
            self._l.refused("store_unavailable", error=str(exc))
            return "451 4.3.0 Report not recorded (storage unavailable), try again later"
        except MailDaemonError as exc:
            self._l.refused("unusable", error=str(exc)[:300])
            return "451 4.3.0 Report not recorded, try again later"
        return f"250 2.0.0 Report {record.report_id} recorded ({record.match_status})"


class ReportListener(Lifecycle):
    """The listener as a supervised component; ``run()`` waits for the stop when disabled."""

    def __init__(self, settings: Settings, store: Store, inst: Instruments) -> None:
        super().__init__()
        self._s = settings
        self._inst = inst
        rp = return_path_of(settings)
        self.enabled = rp is not None and settings.bounce_listen_addr is not None
        self.rp = rp or ReturnPath("invalid.invalid", "-")
        self.intake = ReportIntake(settings, ReportStore(store.pool), inst)
        self.writers = asyncio.Semaphore(WRITERS)
        self.open = 0
        self.port: int | None = None
        self.listening = asyncio.Event()
        self._tls_context: ssl.SSLContext | None = None

    def refused(self, reason: str, **fields: Any) -> None:
        self._inst.report_refusals.add(1, {"reason": reason})
        event(log, "report refused", logging.WARNING, reason=reason, **fields)

    def _tls(self) -> ssl.SSLContext | None:
        cert, key = self._s.bounce_tls_cert_file, self._s.bounce_tls_key_file
        if cert is None or key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        return context

    def _protocol(self) -> asyncio.BaseProtocol:
        if self.open >= self._s.bounce_max_connections:
            self.refused("connections", open=self.open)
            return _Refused()
        return _Session(self, self._tls_context)

    async def run(self) -> None:
        address = self._s.bounce_host_port
        if not self.enabled or address is None:
            await self._stopping.wait()
            return
        host, port = address
        loop = asyncio.get_running_loop()
        self._tls_context = self._tls()
        server = await loop.create_server(self._protocol, host, port)
        self.port = int(server.sockets[0].getsockname()[1])
        self.listening.set()
        event(
            log,
            "report listener listening",
            host=host,
            port=self.port,
            domain=self.rp.domain,
            starttls=self._s.bounce_tls_cert_file is not None,
        )
        try:
            await self._stopping.wait()
        finally:
            server.close()
            await server.wait_closed()
            event(log, "report listener stopped")


class _Session(SMTP):
    """One connection, counted against the bound."""

    def __init__(self, listener: ReportListener, tls: ssl.SSLContext | None) -> None:
        s = listener._s
        super().__init__(
            _Handler(listener),
            data_size_limit=s.bounce_max_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=listener.rp.domain,
            tls_context=tls,
            require_starttls=False,
            timeout=s.bounce_session_timeout,
        )
        self._listener = listener
        # Counted from the moment the connection is accepted (the factory's call), not
        # from connection_made: a burst of accepts runs the factory for all of them first.
        self._counted = True
        listener.open += 1
        self._refused_rcpts = 0
        self._lifetime: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        limit = self._listener._s.bounce_session_timeout * SESSION_TIMEOUTS
        self._lifetime = asyncio.get_running_loop().call_later(limit, self._too_long)

    def _too_long(self) -> None:
        self._listener.refused("session_lifetime", peer=self._peer())
        transport = self.transport
        if transport is not None and not transport.is_closing():
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(b"421 4.4.2 Session too long, closing\r\n")
            transport.close()

    def refused_rcpt(self) -> bool:
        """Count a refused recipient; True (and the connection closing) past the bound."""
        self._refused_rcpts += 1
        if self._refused_rcpts <= MAX_REFUSED_RCPTS:
            return False
        self._listener.refused("refused_recipients", peer=self._peer())
        asyncio.get_running_loop().call_soon(self._close)
        return True

    def _peer(self) -> str:
        return str(self.session.peer) if self.session is not None else "-"

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        if self._lifetime is not None:
            self._lifetime.cancel()
        if self._counted:
            self._counted = False
            self._listener.open -= 1
        super().connection_lost(error)
