"""A message's bytes as the console shows them: headers, text, HTML, attachments, source.

Pure and defensive: the bytes may be anything a producer or an SMTP client sent, so a part
that cannot be decoded is reported as such instead of failing the whole view. The HTML is
returned as data; the console shows it only in a sandboxed frame (no script, no loads).
"""

from __future__ import annotations

from dataclasses import dataclass
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser

SOURCE_LIMIT = 2 * 1024 * 1024  # bytes of the raw source included in a view
_PART_LIMIT = 5 * 1024 * 1024  # characters of one decoded body part


@dataclass(frozen=True, slots=True)
class Header:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class AttachmentInfo:
    filename: str | None
    content_type: str
    size: int


@dataclass(frozen=True, slots=True)
class MessageView:
    size: int
    subject: str | None
    sender: str | None
    to: str | None
    date: str | None
    message_id: str | None
    headers: list[Header]
    text: str | None
    html: str | None
    attachments: list[AttachmentInfo]
    source: str  # the raw message (UTF-8, undecodable bytes replaced), up to SOURCE_LIMIT
    source_truncated: bool
    problems: list[str]  # parts that could not be decoded


def parse(data: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


def header_text(message: Message, name: str) -> str | None:
    try:
        value = message.get(name)
    except Exception:  # a malformed header the policy cannot fold
        return None
    return None if value is None else " ".join(str(value).split())


def view(data: bytes) -> MessageView:
    message = parse(data)
    problems: list[str] = []
    headers = [Header(name, _header_value(message, name, raw)) for name, raw in message.raw_items()]
    text = _body(message, "plain", problems)
    html = _body(message, "html", problems)
    attachments = [
        AttachmentInfo(
            part.get_filename(), part.get_content_type(), len(part.get_payload(decode=True) or b"")
        )
        for part in message.iter_attachments()
    ]
    return MessageView(
        size=len(data),
        subject=header_text(message, "Subject"),
        sender=header_text(message, "From"),
        to=header_text(message, "To"),
        date=header_text(message, "Date"),
        message_id=header_text(message, "Message-ID"),
        headers=headers,
        text=text,
        html=html,
        attachments=attachments,
        source=data[:SOURCE_LIMIT].decode("utf-8", "replace"),
        source_truncated=len(data) > SOURCE_LIMIT,
        problems=problems,
    )


def _header_value(message: EmailMessage, name: str, raw: str) -> str:
    try:
        value = str(message.policy.header_fetch_parse(name, raw))
    except Exception:  # a malformed header the policy cannot parse: show it as sent
        value = raw
    return " ".join(value.split())


def _body(message: EmailMessage, subtype: str, problems: list[str]) -> str | None:
    try:
        part = message.get_body(preferencelist=(subtype,))
    except Exception as exc:
        problems.append(f"text/{subtype}: {type(exc).__name__}")
        return None
    if part is None or part.get_content_type() != f"text/{subtype}":
        return None
    try:
        content = part.get_content()
    except (LookupError, ValueError, AssertionError, UnicodeError) as exc:
        problems.append(f"text/{subtype}: cannot decode ({type(exc).__name__})")
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    if not isinstance(content, str):
        return None
    return content[:_PART_LIMIT]
