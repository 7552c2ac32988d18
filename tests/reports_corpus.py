"""Reports as MTAs write them, built from their published formats: RFC 3464 DSNs (Postfix,
Exchange, Gmail), RFC 5965 ARF complaints (Yahoo, generic), an Exim bounce (its own text
format), an RFC 3834 auto-reply. Each takes the original message (or its header) so the
token travels as it does in the wild."""

from __future__ import annotations

BOUNDARY = "=_report_boundary_1"


def _headers_of(original: bytes) -> bytes:
    head, _, _ = original.partition(b"\r\n\r\n")
    return head + b"\r\n"


def dsn(
    original: bytes,
    recipients: list[tuple[str, str, str, str]],  # (address, action, status, diagnostic)
    *,
    to: str = "bounces@bounces.test.example",
    envid: str | None = None,
    reporting_mta: str = "relay.test.example",
    headers_only: bool = True,
    subject: str = "Undelivered Mail Returned to Sender",
    from_: str = "MAILER-DAEMON@relay.test.example (Mail Delivery System)",
    extra_headers: str = "Auto-Submitted: auto-replied\r\n",
) -> bytes:
    """An RFC 3464 report as Postfix writes it (with RET=HDRS: the original's header)."""
    per_message = f"Reporting-MTA: dns; {reporting_mta}\r\n"
    if envid:
        per_message += f"Original-Envelope-Id: {envid}\r\n"
    per_message += "Arrival-Date: Fri,  4 Dec 2026 02:00:00 +0000 (UTC)\r\n"
    blocks = "".join(
        f"\r\nFinal-Recipient: rfc822; {a}\r\nOriginal-Recipient: rfc822;{a}\r\n"
        f"Action: {action}\r\nStatus: {status}\r\nRemote-MTA: dns; mx.example.com\r\n"
        f"Diagnostic-Code: smtp; {diag}\r\n"
        for a, action, status, diag in recipients
    )
    returned_type = "text/rfc822-headers" if headers_only else "message/rfc822"
    returned = _headers_of(original) if headers_only else original
    return (
        (
            f"Return-Path: <>\r\nFrom: {from_}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"{extra_headers}MIME-Version: 1.0\r\n"
            "Content-Type: multipart/report; report-type=delivery-status;\r\n"
            f' boundary="{BOUNDARY}"\r\n'
            f"\r\nThis is a MIME-encapsulated message.\r\n\r\n--{BOUNDARY}\r\n"
            "Content-Description: Notification\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
            f"I'm sorry to have to inform you that your message could not be delivered.\r\n\r\n"
            f"--{BOUNDARY}\r\nContent-Description: Delivery report\r\n"
            f"Content-Type: message/delivery-status\r\n\r\n{per_message}{blocks}\r\n"
            f"--{BOUNDARY}\r\nContent-Description: Undelivered Message Headers\r\n"
            f"Content-Type: {returned_type}\r\n\r\n"
        ).encode()
        + returned
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def exchange_dsn(original: bytes, address: str, to: str) -> bytes:
    """Microsoft Exchange / Outlook.com: an RFC 3464 report with its own wording."""
    return dsn(
        original,
        [
            (
                address,
                "failed",
                "5.1.10",
                "550 5.1.10 RESOLVER.ADR.RecipientNotFound; "
                "Recipient not found by SMTP address lookup",
            )
        ],
        to=to,
        reporting_mta="AM0PR01MB0000.eurprd01.prod.exchangelabs.com",
        subject="Undeliverable: your message",
        from_="postmaster@outlook.com",
        headers_only=False,
        extra_headers="X-MS-Exchange-Message-Is-Ndr: \r\n",
    )


def gmail_dsn(original: bytes, address: str, to: str) -> bytes:
    """Gmail's 'Delivery Status Notification (Failure)'."""
    return dsn(
        original,
        [
            (
                address,
                "failed",
                "5.1.1",
                "550-5.1.1 The email account that you tried to "
                "reach does not exist. https://support.google.com/mail/?p=NoSuchUser",
            )
        ],
        to=to,
        reporting_mta="mx.google.com",
        subject="Delivery Status Notification (Failure)",
        from_="Mail Delivery Subsystem <mailer-daemon@googlemail.com>",
        headers_only=False,
        extra_headers="Auto-Submitted: auto-replied\r\n",
    )


def arf(
    original: bytes,
    *,
    to: str = "fbl@bounces.test.example",
    feedback_type: str = "abuse",
    original_rcpt: str | None = None,
    user_agent: str = "Yahoo!-Mail-Feedback/2.0",
    from_: str = "feedback@arf.mail.yahoo.com",
) -> bytes:
    """An RFC 5965 feedback report (Yahoo's FBL format: the original attached whole, the
    recipient often redacted, the envelope not ours)."""
    fields = f"Feedback-Type: {feedback_type}\r\nUser-Agent: {user_agent}\r\nVersion: 1\r\n"
    if original_rcpt:
        fields += f"Original-Rcpt-To: {original_rcpt}\r\n"
    fields += "Reported-Domain: test.example\r\n"
    return (
        (
            f"From: {from_}\r\nTo: {to}\r\nSubject: FW: your message\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/report; report-type=feedback-report;\r\n"
            f' boundary="{BOUNDARY}"\r\n'
            f"\r\n--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\n"
            "This is an email abuse report.\r\n"
            f"\r\n--{BOUNDARY}\r\nContent-Type: message/feedback-report\r\n\r\n{fields}\r\n"
            f"--{BOUNDARY}\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
        ).encode()
        + original
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def exim_bounce(original: bytes, address: str, to: str) -> bytes:
    """Exim's own bounce text (no RFC 3464 part), the original quoted after it."""
    return (
        f"Return-path: <>\r\nFrom: Mail Delivery System <Mailer-Daemon@mx.exim.example>\r\n"
        f"To: {to}\r\nSubject: Mail delivery failed: returning message to sender\r\n"
        f"Auto-Submitted: auto-replied\r\nX-Failed-Recipients: {address}\r\n\r\n"
        f"This message was created automatically by mail delivery software.\r\n\r\n"
        f"A message that you sent could not be delivered to one or more of its\r\n"
        f"recipients. This is a permanent error. The following address(es) failed:\r\n\r\n"
        f"  {address}\r\n    SMTP error from remote mail server after RCPT TO:<{address}>:\r\n"
        f"    host mx.example.com [192.0.2.1]: 550 5.1.1 No Such User Here\r\n\r\n"
        f"------ This is a copy of the message, including all the headers. ------\r\n\r\n"
    ).encode() + original


def auto_reply(original_subject: str, to: str) -> bytes:
    """An RFC 3834 vacation reply."""
    return (
        f"From: alice@example.com\r\nTo: {to}\r\nSubject: Out of office: {original_subject}\r\n"
        f"Auto-Submitted: auto-replied\r\nPrecedence: auto_reply\r\n\r\n"
        f"I am away until Monday.\r\n"
    ).encode()
