"""Reading a report: RFC 3464 delivery status notifications, RFC 5965 feedback reports,
RFC 3834 auto-replies, and the non-standard bounces of common MTAs (``flufl.bounce``).

``parse(raw, envelope_to)`` never raises: what cannot be read is ``unparseable`` with the
reason. Work is bounded: at most ``MAX_RECIPIENTS`` recipient blocks and ``MAX_TOKENS``
token candidates are read, and fields are cut to ``FIELD_MAX`` characters.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Iterable, Sequence
from email.message import Message
from email.utils import getaddresses

from flufl.bounce import all_failures

from maildaemon.reports.model import Kind, ParsedReport, RecipientReport
from maildaemon.returnpath import HEADER, ReturnPath, token_like

MAX_RECIPIENTS = 100
MAX_TOKENS = 16
FIELD_MAX = 500
_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_ADDRESS_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "To")
_AUTO_HEADERS = ("X-Autoreply", "X-Autorespond")


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text[:FIELD_MAX] or None


def _typed_address(value: object) -> str | None:
    """``rfc822; bob@example.com`` → ``bob@example.com``."""
    text = _text(value)
    if text is None:
        return None
    _, semi, address = text.partition(";")
    return (address if semi else text).strip().strip("<>").strip() or None


def parse(
    raw: bytes, envelope_to: Sequence[str] = (), rp: ReturnPath | None = None
) -> ParsedReport:
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception as exc:  # the parser is lenient; this is the odd defect it is not
        return ParsedReport("unknown", unparseable=f"not a message: {type(exc).__name__}")
    if not msg.keys():
        return ParsedReport("unknown", unparseable="no header fields: not a message")
    try:
        return _read(msg, envelope_to, rp)
    except (RecursionError, LookupError, ValueError, TypeError, AttributeError) as exc:
        detail = f"cannot read the report: {type(exc).__name__}: {exc}"[:FIELD_MAX]
        return ParsedReport("unknown", unparseable=detail, subject=_text(msg.get("Subject")))


def _read(msg: Message, envelope_to: Sequence[str], rp: ReturnPath | None) -> ParsedReport:
    subject = _text(msg.get("Subject"))
    tokens = _Tokens(rp)
    tokens.addresses(envelope_to)
    tokens.addresses(a for h in _ADDRESS_HEADERS for _, a in getaddresses(msg.get_all(h, [])))
    report_type = (
        (msg.get_param("report-type") or "") if msg.get_content_type() == "multipart/report" else ""
    )
    report_type = str(report_type).lower()
    if report_type == "delivery-status":
        return _dsn(msg, tokens, subject)
    if report_type == "feedback-report":
        return _arf(msg, tokens, subject)
    auto = str(msg.get("Auto-Submitted", "no")).strip().lower()
    automatic = any(msg.get(h) for h in _AUTO_HEADERS) or not auto.startswith("no")
    if automatic and not any(_failures(msg)):
        return ParsedReport("auto_reply", (), tokens.found(), subject, format="rfc3834")
    return _non_standard(msg, tokens, subject)


class _Tokens:
    """Token candidates in the order found (envelope first), at most ``MAX_TOKENS``."""

    def __init__(self, rp: ReturnPath | None) -> None:
        self._rp = rp
        self._found: dict[str, None] = {}

    def add(self, token: str | None) -> None:
        if token and len(self._found) < MAX_TOKENS:
            self._found.setdefault(token.lower(), None)

    def addresses(self, addresses: Iterable[str]) -> None:
        if self._rp is None:
            return
        for address in addresses:
            self.add(self._rp.token_in_address(address))

    def original(self, original: Message | None) -> None:
        """The tokens of the message a report is about: its header, its Return-Path."""
        if original is None:
            return
        for value in original.get_all(HEADER, []):
            self.add(token_like(str(value)))
        self.addresses(a for _, a in getaddresses(original.get_all("Return-Path", [])))

    def found(self) -> tuple[str, ...]:
        return tuple(self._found)


def _original(msg: Message) -> Message | None:
    """The returned message (message/rfc822) or its header (text/rfc822-headers)."""
    for part in msg.walk():
        kind = part.get_content_type()
        if kind == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        elif kind in ("text/rfc822-headers", "message/rfc822-headers"):
            body = part.get_payload(decode=True)
            if isinstance(body, bytes):
                return email.message_from_bytes(body, policy=email.policy.compat32)
    return None


def _is_report(original: Message | None) -> bool:
    return original is not None and original.get_content_type() == "multipart/report"


def _unreadable(tokens: _Tokens, subject: str | None, why: str) -> ParsedReport:
    """A report that names its kind but whose required part cannot be read."""
    return ParsedReport("unknown", tokens=tokens.found(), subject=subject, unparseable=why)


def _dsn(msg: Message, tokens: _Tokens, subject: str | None) -> ParsedReport:
    status_part = next(
        (
            p
            for p in msg.walk()
            if p.get_content_type() in ("message/delivery-status", "message/global-delivery-status")
        ),
        None,
    )
    if status_part is None:
        why = "multipart/report without a message/delivery-status part"
        return _unreadable(tokens, subject, why)
    blocks = status_part.get_payload()
    if not isinstance(blocks, list) or not blocks or not isinstance(blocks[0], Message):
        return _unreadable(tokens, subject, "message/delivery-status without fields")
    per_message = blocks[0]
    original = _original(msg)
    envid = per_message.get("Original-Envelope-Id")
    tokens.add(token_like(str(envid)) if envid else None)
    tokens.original(original)
    remote = _typed_address(per_message.get("Reporting-MTA"))
    recipients: list[RecipientReport] = []
    for block in blocks[1 : MAX_RECIPIENTS + 1]:
        if not isinstance(block, Message):
            continue
        recipient = _dsn_recipient(block, remote)
        if recipient is not None:
            recipients.append(recipient)
    if not recipients:
        return _unreadable(tokens, subject, "delivery status without a recipient's action")
    actions = {r.action for r in recipients}
    kind: Kind = "bounce" if "failed" in actions else "delay" if "delayed" in actions else "unknown"
    return ParsedReport(
        kind,
        tuple(recipients),
        tokens.found(),
        subject,
        loop=_is_report(original),
        format="rfc3464",
    )


def _dsn_recipient(block: Message, reporting: str | None) -> RecipientReport | None:
    address = _typed_address(block.get("Original-Recipient")) or _typed_address(
        block.get("Final-Recipient")
    )
    action = (_text(block.get("Action")) or "").lower().split(" ")[0]
    if not address or action not in ("failed", "delayed", "delivered", "relayed", "expanded"):
        return None
    status = _text(block.get("Status"))
    match = _STATUS.search(status or "")
    return RecipientReport(
        address=address,
        action="failed"
        if action == "failed"
        else "delayed"
        if action == "delayed"
        else "delivered",
        status=match.group(0) if match else None,
        diagnostic=_text(block.get("Diagnostic-Code")),
        remote_mta=_typed_address(block.get("Remote-MTA")) or reporting,
    )


def _arf(msg: Message, tokens: _Tokens, subject: str | None) -> ParsedReport:
    part = next((p for p in msg.walk() if p.get_content_type() == "message/feedback-report"), None)
    if part is None:
        why = "multipart/report without a message/feedback-report part"
        return _unreadable(tokens, subject, why)
    fields = part.get_payload()
    if isinstance(fields, list) and fields and isinstance(fields[0], Message):
        report = fields[0]
    else:  # some senders put the fields in the part's body as text
        body = part.get_payload(decode=True)
        report = email.message_from_bytes(
            body if isinstance(body, bytes) else b"", policy=email.policy.compat32
        )
    feedback = (_text(report.get("Feedback-Type")) or "").lower()
    if not feedback:
        return _unreadable(tokens, subject, "feedback report without Feedback-Type")
    original = _original(msg)
    tokens.original(original)
    addresses = [a for _, a in getaddresses(report.get_all("Original-Rcpt-To", []))]
    if not addresses and original is not None:
        addresses = [a for _, a in getaddresses(original.get_all("To", []))]
    if feedback == "not-spam":
        return ParsedReport("unknown", (), tokens.found(), subject, format="rfc5965")
    source = _typed_address(report.get("Reporting-MTA")) or _text(report.get("User-Agent"))
    recipients = tuple(
        RecipientReport(a, "complained", None, f"feedback-type: {feedback}", source)
        for a in addresses[:MAX_RECIPIENTS]
        if a
    )
    return ParsedReport("complaint", recipients, tokens.found(), subject, format="rfc5965")


def _decoded(values: Iterable[object]) -> set[str]:
    return {v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values}


def _failures(msg: Message) -> tuple[set[str], set[str]]:
    temporary, permanent = all_failures(msg)
    return _decoded(temporary), _decoded(permanent)


def _non_standard(msg: Message, tokens: _Tokens, subject: str | None) -> ParsedReport:
    """A bounce in an MTA's own format (Exim, Exchange, qmail, ...), read by flufl.bounce."""
    temporary, permanent = _failures(msg)
    original = _original(msg)
    tokens.original(original)
    if not temporary and not permanent:
        if original is None:
            tokens.original(_embedded_headers(msg))
        return ParsedReport("unknown", (), tokens.found(), subject)
    status = _STATUS.search(_body_text(msg))
    code = status.group(0) if status else None
    recipients = [
        RecipientReport(a, "failed", code if code and code[0] == "5" else None, None)
        for a in sorted(permanent)[:MAX_RECIPIENTS]
    ]
    recipients += [
        RecipientReport(a, "delayed", code if code and code[0] == "4" else None, None)
        for a in sorted(temporary - permanent)[:MAX_RECIPIENTS]
    ]
    kind: Kind = "bounce" if permanent else "delay"
    if original is None:
        tokens.original(_embedded_headers(msg))
    return ParsedReport(
        kind,
        tuple(recipients),
        tokens.found(),
        subject,
        loop=_is_report(original),
        format="flufl.bounce",
    )


def _body_text(msg: Message) -> str:
    for part in msg.walk():
        if part.get_content_type() == "text/plain":
            body = part.get_payload(decode=True)
            if isinstance(body, bytes):
                return body[:65536].decode("utf-8", "replace")
    return ""


def _embedded_headers(msg: Message) -> Message | None:
    """A bounce that quotes the original inline (text after its own text): the header
    lines that look like ours, read as a header block."""
    text = _body_text(msg)
    lines = [
        ln
        for ln in text.splitlines()
        if ln.lower().startswith((HEADER.lower() + ":", "return-path:"))
    ]
    if not lines:
        return None
    return email.message_from_string("\n".join(lines) + "\n\n", policy=email.policy.compat32)
