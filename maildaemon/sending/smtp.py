"""SMTP transport: one kept-open connection per worker, STARTTLS required in ``smtp`` mode.

The transport reports what the server said, per recipient; ``outcomes`` decides what that
means for the delivery. Connection-level failures are raised as ``TransportError``s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import aiosmtplib
from aiosmtplib import SMTPResponse

from maildaemon.addresses import AddressError, canonical_address
from maildaemon.config import Settings
from maildaemon.errors import (
    InsecureTransportError,
    NotBegun,
    PermanentTransportError,
    TransientTransportError,
    TransportError,
    TransportTimeout,
    UnknownOutcome,
)
from maildaemon.logs import event
from maildaemon.returnpath import xtext
from maildaemon.sending.reply import Reply, SendReport, storable_text
from maildaemon.sending.size import advertised_limit, mail_parameter

log = logging.getLogger("maildaemon.smtp")
# Wraps each connection phase ("smtp connect", "smtp starttls", "smtp auth"); the attempt
# workers set it to open a span per phase.
PhaseHook = Callable[[str], AbstractContextManager[object]]


def _untraced(_: str) -> AbstractContextManager[object]:
    return contextlib.nullcontext()


def tls_context(settings: Settings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(
        cafile=str(settings.smtp_ca_file) if settings.smtp_ca_file else None
    )
    if not settings.smtp_tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def server_said(exc: aiosmtplib.SMTPResponseException) -> tuple[int | None, str]:
    """An aiosmtplib reply error's code and text as they are recorded: the text storable
    (aiosmtplib decodes with ``surrogateescape``), no code for its ``-1`` (no valid reply:
    too long, or not an SMTP reply line)."""
    return (exc.code if 200 <= exc.code <= 599 else None), storable_text(exc.message)


def envelope(address: str) -> bytes:
    """An address as it goes in MAIL FROM / RCPT TO: its canonical form (IDNA 2008)."""
    try:
        return canonical_address(address).encode("ascii")
    except (AddressError, UnicodeError) as exc:
        raise PermanentTransportError(f"address cannot be sent over SMTP: {address!r}") from exc


def dsn_mail(envid: str | None, offered: bool) -> bytes:
    """MAIL FROM's RFC 3461 parameters: headers only in a report, the envelope id; nothing
    when the server does not offer DSN or no envelope id is given."""
    if envid is None or not offered:
        return b""
    return b" RET=HDRS ENVID=" + xtext(envid).encode("ascii")


def dsn_rcpt(rcpt: str, envid: str | None, offered: bool) -> bytes:
    """RCPT TO's RFC 3461 parameters: report failures and delays, with the address as given."""
    if envid is None or not offered:
        return b""
    return b" NOTIFY=FAILURE,DELAY ORCPT=rfc822;" + xtext(envelope(rcpt).decode("ascii")).encode(
        "ascii"
    )


class SmtpConnection:
    """One SMTP session, opened lazily and reused across messages."""

    def __init__(
        self,
        settings: Settings,
        context: ssl.SSLContext,
        may_begin: Callable[[], bool] | None = None,
    ) -> None:
        self._settings = settings
        # Asked right before MAIL FROM: False (shutdown) means no new transaction begins.
        self._may_begin = may_begin
        self._context = context
        self._host, self._port = settings.smtp_host_port if settings.smtp_addr else ("", 0)
        self._client: aiosmtplib.SMTP | None = None
        self._dirty = False  # a transaction was left half-way: RSET before the next one
        self.in_data = False  # the message data may be on its way: an abort is "unknown"
        self.stage = "connect"  # the SMTP step under way (errors and timeouts name it)
        self.phase: PhaseHook = _untraced

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            try:
                await asyncio.wait_for(client.quit(), 2)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()

    def abort(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self._settings
        implicit = s.smtp_security == "tls"
        client = aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            use_tls=implicit,
            start_tls=False,
            tls_context=self._context if implicit else None,
            timeout=s.smtp_timeout,
            local_hostname=s.smtp_helo_name,
        )
        try:
            await self._open_session(client, implicit)
        except BaseException:
            client.close()
            raise
        self._dirty = False
        event(
            log,
            "smtp connected",
            logging.DEBUG,
            host=self._host,
            port=self._port,
            tls=client.is_connected,
        )
        return client

    async def _open_session(self, client: aiosmtplib.SMTP, implicit: bool) -> None:
        """Connect, read the banner, EHLO, STARTTLS, EHLO again, AUTH; errors name the stage."""
        s = self._settings
        where = f"{self._host}:{self._port}"
        try:
            with self.phase("smtp connect"):
                self.stage = "connect"
                await client.connect()
                self.stage = "ehlo"
                await client.ehlo()
            if not implicit:
                with self.phase("smtp starttls"):
                    self.stage = "starttls"
                    await self._starttls(client)
                    self.stage = "ehlo"
                    await client.ehlo()
            if s.smtp_username and s.smtp_password:
                with self.phase("smtp auth"):
                    self.stage = "auth"
                    await client.login(s.smtp_username, s.smtp_password.get_secret_value())
        except InsecureTransportError:
            raise
        except aiosmtplib.SMTPAuthenticationError as exc:
            code, text = server_said(exc)
            raise TransientTransportError(
                f"SMTP authentication failed: {code} {text}", code=code, text=text, stage="auth"
            ) from exc
        except aiosmtplib.SMTPTimeoutError as exc:
            raise TransportTimeout(
                f"timed out at {self.stage} with {where}", stage=self.stage
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            code, text = server_said(exc)
            raise TransientTransportError(
                f"{self.stage} refused by the server: {code} {text}",
                code=code,
                text=text,
                stage=self.stage,
            ) from exc
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
            if isinstance(exc, ssl.SSLError | ssl.CertificateError) or "certificate" in str(exc):
                raise InsecureTransportError(f"TLS failed: {exc}", stage=self.stage) from exc
            raise TransientTransportError(
                f"cannot connect to {where} ({self.stage}): {exc}", stage=self.stage
            ) from exc

    async def _starttls(self, client: aiosmtplib.SMTP) -> None:
        if not client.supports_extension("starttls"):
            raise InsecureTransportError(
                f"{self._host}:{self._port} does not offer STARTTLS; "
                "refusing to send in clear text",
                stage="starttls",
            )
        try:
            await client.starttls(tls_context=self._context)
        except aiosmtplib.SMTPTimeoutError:
            raise
        except aiosmtplib.SMTPResponseException as exc:
            code, text = server_said(exc)
            raise InsecureTransportError(
                f"STARTTLS refused: {code} {text}", code=code, text=text, stage="starttls"
            ) from exc
        except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
            raise InsecureTransportError(
                f"STARTTLS handshake failed: {exc}", stage="starttls"
            ) from exc

    async def open(self) -> None:
        """Open the session now (connect, banner, EHLO, STARTTLS, AUTH) if it is not open."""
        if self._client is None or not self._client.is_connected:
            self._client = await self._connect()

    async def send(
        self, sender: str, recipients: Sequence[str], message: bytes, envid: str | None = None
    ) -> SendReport:
        """Send one message; reconnects once if the kept-open link turned out to be dead.

        ``envid``: ask for delivery status notifications (RFC 3461) with this envelope id,
        when the server offers DSN."""
        try:
            return await self._send_once(sender, recipients, message, envid)
        except _StaleConnection:
            self.abort()
            try:
                return await self._send_once(sender, recipients, message, envid)
            except _StaleConnection as exc:
                self.abort()
                raise TransientTransportError(f"connection lost before DATA: {exc}") from exc

    async def _send_once(
        self, sender: str, recipients: Sequence[str], message: bytes, envid: str | None = None
    ) -> SendReport:
        self.in_data = False
        fresh = self._client is None or not self._client.is_connected
        if fresh:
            self._client = await self._connect()
        client = self._client
        assert client is not None
        if self._may_begin is not None and not self._may_begin():
            raise NotBegun("stopping: no new SMTP transaction begins")
        size = mail_parameter(message, advertised_limit(client.esmtp_extensions))
        dsn = client.supports_extension("dsn")
        report = SendReport()
        started = time.perf_counter()
        try:
            if self._dirty:
                self.stage = "rset"
                await client.rset()
            self._dirty = True
            self.stage = "mail"
            # MAIL and RCPT through execute_command with pre-encoded addresses: the
            # client's own mail()/rcpt() re-parse every address with email.utils.
            resp = await client.execute_command(
                b"MAIL", b"FROM:<" + envelope(sender) + b">" + size + dsn_mail(envid, dsn)
            )
            if resp.code != 250:
                await self._reset(client)
                report.data_refused = Reply(resp.code, resp.message)
                return report
            self.stage = "rcpt"
            for rcpt in recipients:
                resp = await client.execute_command(
                    b"RCPT", b"TO:<" + envelope(rcpt) + b">" + dsn_rcpt(rcpt, envid, dsn)
                )
                if resp.code in (250, 251):
                    report.accepted[rcpt] = Reply(resp.code, resp.message)
                elif resp.code >= 500:
                    report.refused[rcpt] = Reply(resp.code, resp.message)
                else:
                    report.deferred[rcpt] = Reply(resp.code, resp.message)
            if not report.accepted:
                await self._reset(client)
                return report
            self.stage = "data"
            start = await client.execute_command(b"DATA")
            if start.code != 354:
                await self._reset(client)
                report.data_refused = Reply(start.code, start.message)
                return report
            self.in_data = True
            self.stage = "end of data"
            try:
                resp2: SMTPResponse = await self._transfer(client, message)
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
                self.abort()
                raise UnknownOutcome(
                    f"link lost during DATA, before the server's reply: {exc}",
                    stage="end of data",
                ) from exc
            self.in_data = False
            if resp2.code != 250:
                await self._reset(client)
                report.data_refused = Reply(resp2.code, resp2.message)
                return report
            report.data_reply = Reply(resp2.code, resp2.message)
            self._dirty = False
            return report
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
            self.abort()
            if not fresh:
                raise _StaleConnection(str(exc)) from exc
            raise TransientTransportError(
                f"connection lost at {self.stage}: {exc}", stage=self.stage
            ) from exc
        except aiosmtplib.SMTPTimeoutError as exc:
            self.abort()
            raise TransportTimeout(
                f"SMTP server did not answer in time at {self.stage}: {exc}", stage=self.stage
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            self.abort()
            code, text = server_said(exc)
            if self.in_data:  # no valid reply to the message data: it may have been taken
                raise UnknownOutcome(
                    f"no valid reply to the message data: {text}", stage=self.stage
                ) from exc
            kind = PermanentTransportError if code and code >= 500 else TransientTransportError
            raise kind(
                f"{self.stage}: {code} {text}", code=code, text=text, stage=self.stage
            ) from exc
        except aiosmtplib.SMTPException as exc:
            self.abort()
            raise TransientTransportError(f"{self.stage}: {exc}", stage=self.stage) from exc
        finally:
            report.duration_ms = (time.perf_counter() - started) * 1000

    async def _transfer(self, client: aiosmtplib.SMTP, message: bytes) -> SMTPResponse:
        """Send the message data after a 354 and read the final reply.

        The message is pinned with CRLF line endings already (the MIME builder writes
        nothing else), so only dot-stuffing is needed, done with bytes.replace; the
        client's data() would run two regular expressions over every message again.
        """
        protocol = client.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost before the data")
        payload = message.replace(b"\r\n.", b"\r\n..")
        if payload.startswith(b"."):
            payload = b"." + payload
        if not payload.endswith(b"\r\n"):
            payload += b"\r\n"
        protocol.write(payload + b".\r\n")
        return await protocol.read_response(timeout=self._settings.smtp_timeout)

    async def _reset(self, client: aiosmtplib.SMTP) -> None:
        try:
            await client.rset()
            self._dirty = False
        except (aiosmtplib.SMTPException, OSError):
            self.abort()


class _StaleConnection(TransportError):
    """A reused connection was found closed before anything was sent."""
