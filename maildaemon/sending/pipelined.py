"""Pipelined SMTP transactions: RFC 2920 PIPELINING and RFC 3030 CHUNKING.

aiosmtplib still opens the connection, does STARTTLS (certificate verified) and AUTH.
When the server's EHLO then offers PIPELINING, the TLS transport is handed to
``ReplyReader``, which keeps every reply in order, and each message goes out in as few
writes as the server allows:

    CHUNKING     [RSET] MAIL RCPT… BDAT <n> LAST <message>         one round trip
    PIPELINING   [RSET] MAIL RCPT… DATA  │  <message> .             two round trips
                 … <message> . MAIL RCPT… DATA  │  <next message> .  one, back to back

With PIPELINING alone, the next message's envelope goes right behind a message's data
when the worker has it at hand (``lookahead``; RFC 2920 3.1 lets MAIL follow the end of
data in one write): its replies are read at the start of that message's own transaction,
so a kept-open connection costs about one reply flight per message. The end of data ends
the transaction whatever its reply, so no RSET is needed; a message's outcome never
depends on its successor's replies, and a failure while reading the successor's envelope
replies is that successor's (nothing of it but the envelope was sent: it is retried).

Every reply is still paired with its command, so the report is the one the
one-command-at-a-time transport gives: per-recipient replies, DATA refused when nobody
was accepted (no message data is sent after DATA; with BDAT the server discards the
chunk), ``UnknownOutcome`` when the link is lost after the message data went out and
before its reply. A server that answers out of step (more replies than commands in the
segments read, lines that are not SMTP replies, DATA answered with neither 354 nor an
error) loses the connection; when the message data was already out, the attempt is
``UnknownOutcome`` too, never ``sent``. Servers without PIPELINING, and
``MAIL_SMTP_PIPELINING=off``, get ``SmtpConnection``'s one command at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from maildaemon.config import Settings
from maildaemon.errors import (
    NotBegun,
    PermanentTransportError,
    TransientTransportError,
    TransportError,
    TransportTimeout,
    UnknownOutcome,
)
from maildaemon.sending.reply import Reply, SendReport
from maildaemon.sending.session import LinkLost, OutOfStep, ReplyReader, Session
from maildaemon.sending.size import mail_parameter
from maildaemon.sending.smtp import (
    SmtpConnection,
    _StaleConnection,
    dsn_mail,
    dsn_rcpt,
    envelope,
)

# A kept-open connection idle longer than this is probed with NOOP before a BDAT flight,
# so that a server that has just timed it out does not turn the message into "unknown".
IDLE_PROBE_S = 5.0
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")

# What the worker may send next on this connection: (sender, recipients, message, envid).
Envelope = tuple[str, Sequence[str], bytes, str | None]


@dataclass(frozen=True, slots=True)
class _Ahead:
    """A message whose MAIL/RCPT/DATA went out behind the previous message's data."""

    message: bytes
    recipients: tuple[str, ...]
    flight: _Flight


def _address(prefix: bytes, address: str, parameters: bytes = b"") -> bytes:
    encoded = envelope(address)
    if _CONTROL.search(encoded):
        raise PermanentTransportError(f"address cannot be sent over SMTP: {address!r}")
    return prefix + encoded + b">" + parameters + b"\r\n"


def _envelope_commands(session: Session, sending: Envelope, size: bytes) -> list[bytes]:
    """MAIL FROM and one RCPT TO per recipient, with DSN parameters when the server offers
    DSN and the envelope has an id."""
    sender, recipients, _, envid = sending
    commands = [_address(b"MAIL FROM:<", sender, size + dsn_mail(envid, session.dsn))]
    commands.extend(
        _address(b"RCPT TO:<", rcpt, dsn_rcpt(rcpt, envid, session.dsn)) for rcpt in recipients
    )
    return commands


class PipeliningConnection(SmtpConnection):
    """``SmtpConnection`` that pipelines when the server offers it (and the setting allows)."""

    def __init__(
        self,
        settings: Settings,
        context: ssl.SSLContext,
        may_begin: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(settings, context, may_begin)
        self._enabled = settings.smtp_pipelining == "auto"
        self._timeout = settings.smtp_timeout
        self._session: Session | None = None
        # Hands over the next message to send on this connection, if one is at hand (the
        # caller then sends it next); None: send each message's envelope in its own flight.
        self.lookahead: Callable[[], Envelope | None] | None = None
        self._ahead: _Ahead | None = None

    @property
    def pipelining(self) -> bool:
        """Whether the open connection (if any) is driven pipelined."""
        return self._session is not None

    async def close(self) -> None:
        self._ahead = None
        session, self._session = self._session, None
        if session is not None:
            await session.quit()
        await super().close()

    def abort(self) -> None:
        self._ahead = None
        session, self._session = self._session, None
        if session is not None:
            session.reader.transport.abort()
        super().abort()

    async def _send_once(
        self, sender: str, recipients: Sequence[str], message: bytes, envid: str | None = None
    ) -> SendReport:
        fresh = False
        unopened = self._client is None or not self._client.is_connected
        if self._enabled and self._session is None and unopened:
            self.in_data = False
            client = await self._connect()
            if client.supports_extension("pipelining"):
                self._session = Session.take_over(client)
                fresh = True
            else:
                self._client = client
        if self._session is None:
            return await super()._send_once(sender, recipients, message, envid)
        report = SendReport()
        started = time.perf_counter()
        # in_data stays as it is when this raises: the worker's timeout reads it.
        sending = (sender, recipients, message, envid)
        await self._transaction(self._session, fresh, sending, report)
        self.in_data = False
        report.duration_ms = (time.perf_counter() - started) * 1000
        return report

    async def _transaction(
        self,
        session: Session,
        fresh: bool,
        sending: Envelope,
        report: SendReport,
    ) -> None:
        self.in_data = False
        _, recipients, message, _ = sending
        reader = session.reader
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            await self._after_previous(session, ahead, recipients, message, report)
            return
        if reader.failure is not None or not reader.idle:
            # Closed while it sat idle, or a reply nobody asked for (a 421 before closing).
            self.abort()
            raise _StaleConnection("kept-open connection closed or out of step")
        if self._may_begin is not None and not self._may_begin():
            raise NotBegun("stopping: no new SMTP transaction begins")
        size = mail_parameter(message, session.size_limit)
        self.stage = "mail"  # the whole flight: MAIL, RCPT, DATA or BDAT
        commands = [b"RSET\r\n"] if session.dirty else []
        commands.extend(_envelope_commands(session, sending, size))
        flight = _Flight(len(commands) - len(recipients) - 1, recipients)
        session.dirty = True
        if session.chunking:
            if not fresh and time.monotonic() - reader.last_activity > IDLE_PROBE_S:
                await self._probe(reader)
            commands.append(b"BDAT %d LAST\r\n" % len(message))
            await self._chunked(session, fresh, b"".join(commands) + message, flight, report)
        else:
            commands.append(b"DATA\r\n")
            await self._data(session, fresh, b"".join(commands), message, flight, report)
        if report.data_reply is not None:
            session.dirty = False

    async def _after_previous(
        self,
        session: Session,
        ahead: _Ahead,
        recipients: Sequence[str],
        message: bytes,
        report: SendReport,
    ) -> None:
        """The transaction whose envelope went out behind the previous message's data:
        read its replies (they are queued in order), then go on as any other."""
        if ahead.message is not message or ahead.recipients != tuple(recipients):
            self.abort()  # the server waits for another message's data: start afresh
            raise _StaleConnection("the message sent ahead is not the one to send")
        if self._may_begin is not None and not self._may_begin():
            self.abort()  # its MAIL went before the stop; its data must not follow
            raise NotBegun("stopping: no new SMTP transaction begins")
        self.stage = "mail"
        session.dirty = True
        # Not fresh: a failure here met nothing deliverable of this message (retried).
        await self._data(session, False, b"", message, ahead.flight, report)
        if report.data_reply is not None:
            session.dirty = False

    def _next_envelope(self, session: Session) -> tuple[bytes, _Ahead] | None:
        """The next message's MAIL/RCPT/DATA, to go behind this message's end of data."""
        if self.lookahead is None or (self._may_begin is not None and not self._may_begin()):
            return None
        taken = self.lookahead()
        if taken is None:
            return None
        _, recipients, message, _ = taken
        try:
            size = mail_parameter(message, session.size_limit)
            commands = _envelope_commands(session, taken, size)
        except TransportError:  # it fails on its own when it is sent (too large, bad address)
            return None
        commands.append(b"DATA\r\n")
        flight = _Flight(0, recipients)
        return b"".join(commands), _Ahead(message, tuple(recipients), flight)

    async def _exchange(
        self,
        reader: ReplyReader,
        data: bytes,
        expected: int,
        replies: list[Reply],
        more: bool = False,
    ) -> None:
        """Write one flight, then read its ``expected`` replies into ``replies``.

        ``replies`` keeps what arrived when this raises: a write refused because the link
        is gone still reads every reply that came before it went (a refusal, then the
        server's close). Replies beyond ``expected`` that came with them (more replies than
        commands) raise ``OutOfStep`` — unless ``more`` are due (a message sent ahead).
        """
        if data:
            with contextlib.suppress(LinkLost):
                reader.write(data)  # if it is lost, reply() says so once the queue is empty
        async with asyncio.timeout(self._timeout):
            while len(replies) < expected:
                replies.append(await reader.reply())
        if not more and not reader.idle:
            raise OutOfStep("the server sent more replies than there were commands")

    async def _probe(self, reader: ReplyReader) -> None:
        replies: list[Reply] = []
        try:
            await self._exchange(reader, b"NOOP\r\n", 1, replies)
        except (LinkLost, OutOfStep, TimeoutError) as exc:
            self.abort()
            raise _StaleConnection(f"idle connection did not answer NOOP: {exc}") from exc
        if replies[0].code != 250:
            self.abort()
            raise _StaleConnection(f"idle connection answered NOOP with {replies[0].code}")

    def _failed_before_data(self, fresh: bool, exc: BaseException) -> TransportError:
        """The link failed while nothing the server could deliver had been sent."""
        self.abort()
        if isinstance(exc, TimeoutError):
            return TransportTimeout("SMTP server did not answer in time", stage=self.stage)
        if isinstance(exc, OutOfStep):
            return TransientTransportError(f"SMTP server out of step: {exc}", stage=self.stage)
        if not fresh:
            return _StaleConnection(str(exc))
        return TransientTransportError(f"connection lost: {exc}", stage=self.stage)

    def _closing(self, fresh: bool, replies: Sequence[Reply]) -> None:
        """A 421 to the first command of a flight on a kept-open connection: the server had
        timed it out and acted on nothing; reconnect and send again."""
        if not fresh and replies and replies[0].code == 421:
            self.abort()
            raise _StaleConnection(f"{replies[0].code} {replies[0].text}")

    async def _data(
        self,
        session: Session,
        fresh: bool,
        commands: bytes,
        message: bytes,
        flight: _Flight,
        report: SendReport,
    ) -> None:
        reader = session.reader
        replies: list[Reply] = []
        try:
            await self._exchange(reader, commands, flight.size, replies)
        except (LinkLost, OutOfStep, TimeoutError) as exc:
            self._closing(fresh, replies)
            if flight.settled(replies, report):
                self.abort()
                return
            raise self._failed_before_data(fresh, exc) from exc
        self._closing(fresh, replies)
        flight.read_envelope(replies, report)
        start = replies[-1]
        if start.code != 354:
            if start.code < 400:
                raise self._failed_before_data(
                    True, OutOfStep(f"DATA answered {start.code} {start.text}")
                )
            if report.data_refused is None and report.accepted:
                report.data_refused = start
            return
        if report.data_refused is not None or not report.accepted:
            # RFC 2920 3.1: DATA went ahead although nobody can get the message; end it empty.
            try:
                await self._exchange(reader, b".\r\n", 1, [])
            except (LinkLost, OutOfStep, TimeoutError):
                self.abort()
            return
        payload = message.replace(b"\r\n.", b"\r\n..")
        if payload.startswith(b"."):
            payload = b"." + payload
        if not payload.endswith(b"\r\n"):
            payload += b"\r\n"
        self.in_data = True
        final: list[Reply] = []
        behind = self._next_envelope(session)
        data = payload + b".\r\n" + (behind[0] if behind else b"")
        try:
            await self._exchange(reader, data, 1, final, more=behind is not None)
            self._ahead = behind[1] if behind else None
        except (LinkLost, OutOfStep, TimeoutError) as exc:
            self.abort()
            raise UnknownOutcome(
                f"link lost during DATA, before the server's reply: {_why(exc)}"
            ) from exc
        _finish(report, final[0])

    async def _chunked(
        self,
        session: Session,
        fresh: bool,
        data: bytes,
        flight: _Flight,
        report: SendReport,
    ) -> None:
        replies: list[Reply] = []
        self.in_data = True  # the message is in this very write
        try:
            await self._exchange(session.reader, data, flight.size, replies)
        except (LinkLost, OutOfStep, TimeoutError) as exc:
            self._closing(fresh, replies)
            if flight.settled(replies, report):
                self.abort()  # refused before the data: the server discarded the chunk
                return
            if any(r.code == 421 for r in replies):
                # The server said it was closing (RFC 5321 3.8): it acted on nothing later,
                # so the chunk was not taken either.
                raise self._failed_before_data(True, exc) from exc
            self.abort()
            raise UnknownOutcome(
                f"link lost after the message data, before the server's reply: {_why(exc)}"
            ) from exc
        self._closing(fresh, replies)
        flight.read_envelope(replies, report)
        if report.data_refused is None and report.accepted:
            _finish(report, replies[-1])
        # else nobody was accepted: the server discarded the chunk (its reply is a 503/554)


class _Flight:
    """Where MAIL's and the RCPTs' replies sit in a flight's replies."""

    def __init__(self, leading: int, recipients: Sequence[str]) -> None:
        self.mail = leading  # a leading RSET's reply comes first
        self.recipients = recipients
        self.rcpt_count = len(recipients)

    @property
    def size(self) -> int:
        """Replies in the flight: [RSET] MAIL RCPT… DATA|BDAT."""
        return self.mail + 1 + self.rcpt_count + 1

    def settled(self, replies: Sequence[Reply], report: SendReport) -> bool:
        """The flight broke off (link lost, out of step, silence): do the replies that did
        arrive decide the transaction as ``SmtpConnection``, one command at a time, decides
        it? MAIL refused, or every RCPT answered and none accepted: the message cannot be
        sent on this connection whatever came next, and ``report`` says why. Otherwise the
        next command would have met the failure; the caller reports it."""
        if len(replies) <= self.mail:
            return False
        mail = replies[self.mail].code
        rcpts = replies[self.mail + 1 : self.mail + 1 + self.rcpt_count]
        refused = mail >= 400 or (
            mail == 250 and len(rcpts) == self.rcpt_count and all(r.code >= 400 for r in rcpts)
        )  # anything else there (a 354 to RCPT: a reply missing) is out of step
        if refused:
            self.read_envelope(replies, report)
        return refused

    def read_envelope(self, replies: Sequence[Reply], report: SendReport) -> None:
        """What the MAIL and RCPT replies say, reported as ``SmtpConnection`` reports it."""
        mail = replies[self.mail]
        if mail.code != 250:
            report.data_refused = mail  # nobody gets it; the RCPT replies are 503s
            return
        rcpts = replies[self.mail + 1 : self.mail + 1 + self.rcpt_count]
        for rcpt, reply in zip(self.recipients, rcpts, strict=True):
            if reply.code in (250, 251):
                report.accepted[rcpt] = reply
            elif reply.code >= 500:
                report.refused[rcpt] = reply
            else:
                report.deferred[rcpt] = reply


def _finish(report: SendReport, final: Reply) -> None:
    if final.code == 250:
        report.data_reply = final
    else:
        report.data_refused = final


def _why(exc: BaseException) -> str:
    return "no reply in time" if isinstance(exc, TimeoutError) else str(exc)
