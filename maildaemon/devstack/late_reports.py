"""The dev sink as a relay that reports later: mail to a ``bounce@…``, ``delay@…`` or
``complaint@…`` address is accepted with 250 and, a moment later, answered with a real RFC
3464 DSN (hard bounce 5.1.1, or a delay 4.4.1) or an RFC 5965 ARF complaint, sent to the
envelope sender at the daemon's report listener — the whole loop in ``maildaemon dev``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from email.utils import formatdate

import aiosmtplib

from maildaemon.devstack.smtp_script import ReceivedMessage

log = logging.getLogger("maildaemon.devstack.late_reports")
TEST_LOCAL_PARTS = ("bounce", "delay", "complaint")
_B = "=_dev_report"


def _header_block(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[0] + b"\r\n"


def dsn(message: ReceivedMessage, rcpt: str, delayed: bool) -> bytes:
    """An RFC 3464 report about ``rcpt`` (RET=HDRS: the original's header returned)."""
    action, status, diag = (
        ("delayed", "4.4.1", "451 4.4.1 mailbox temporarily unavailable (dev sink)")
        if delayed
        else ("failed", "5.1.1", "550 5.1.1 user unknown (dev sink)")
    )
    subject = (
        "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    )
    head = (
        f"From: MAILER-DAEMON@dev-sink.localhost (Mail Delivery System)\r\n"
        f"To: {message.mail_from}\r\nSubject: {subject}\r\nDate: {formatdate()}\r\n"
        f"Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{_B}"\r\n\r\n'
        f"--{_B}\r\nContent-Type: text/plain\r\n\r\nYour message to {rcpt} "
        f"{'is delayed' if delayed else 'could not be delivered'}.\r\n\r\n"
        f"--{_B}\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; dev-sink.localhost\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nOriginal-Recipient: rfc822;{rcpt}\r\n"
        f"Action: {action}\r\nStatus: {status}\r\nDiagnostic-Code: smtp; {diag}\r\n\r\n"
        f"--{_B}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    )
    return head.encode() + _header_block(message.data) + f"\r\n--{_B}--\r\n".encode()


def arf(message: ReceivedMessage, rcpt: str) -> bytes:
    """An RFC 5965 abuse report about the message, the original attached (as FBLs send it)."""
    head = (
        f"From: feedback@dev-sink.localhost\r\nTo: {message.mail_from}\r\n"
        f"Subject: Abuse report\r\nDate: {formatdate()}\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=feedback-report; boundary="{_B}"\r\n\r\n'
        f"--{_B}\r\nContent-Type: text/plain\r\n\r\nThe recipient marked this as spam.\r\n\r\n"
        f"--{_B}\r\nContent-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: abuse\r\nUser-Agent: maildaemon-dev-sink/1\r\nVersion: 1\r\n"
        f"Original-Rcpt-To: {rcpt}\r\n\r\n"
        f"--{_B}\r\nContent-Type: message/rfc822\r\n\r\n"
    )
    return head.encode() + message.data + f"\r\n--{_B}--\r\n".encode()


def reports_for(message: ReceivedMessage) -> list[bytes]:
    """The reports a message to the test addresses earns (none for any other address)."""
    out = []
    for rcpt in message.rcpt_tos:
        local = rcpt.rpartition("@")[0].lower()
        if local == "bounce":
            out.append(dsn(message, rcpt, delayed=False))
        elif local == "delay":
            out.append(dsn(message, rcpt, delayed=True))
        elif local == "complaint":
            out.append(arf(message, rcpt))
    return out


class LateReporter:
    """Sends the reports a moment after the message was accepted (never blocking the sink)."""

    def __init__(self, host: str, port: int, after_s: float = 1.0) -> None:
        self._host, self._port, self._after = host, port, after_s
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0

    def __call__(self, message: ReceivedMessage) -> None:
        if not message.mail_from:
            return  # a report about a report is never answered
        for report in reports_for(message):
            task = asyncio.ensure_future(self._send(message.mail_from, report))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, to: str, report: bytes) -> None:
        await asyncio.sleep(self._after)
        for attempt in range(5):  # the daemon may not be listening yet
            try:
                client = aiosmtplib.SMTP(
                    hostname=self._host, port=self._port, start_tls=False, timeout=10
                )
                async with client:
                    await client.sendmail("", [to], report)  # a report: null sender
                self.sent += 1
                log.info("dev_sink_report_sent to=%s bytes=%d", to, len(report))
                return
            except (aiosmtplib.SMTPException, OSError) as exc:
                log.warning("dev_sink_report_failed to=%s attempt=%d error=%s", to, attempt, exc)
                await asyncio.sleep(1.0 + attempt)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
