"""What an SMTP server answered: one reply, and the report of one message's transaction.

A server's reply text ends up in PostgreSQL (attempt rows, the delivery's last reply, the
recipients' JSON, the outcome event), in log lines and in the operator's views, so it is
made storable where it enters: ``storable_text`` keeps valid UTF-8, escapes what is not
(``\\xe4`` for a Latin-1 byte), escapes NUL and the other control characters except tab
and the newline that joins a multi-line reply's lines, and bounds the length. ``Reply``
applies it to every text it is given, so no reply from a server can hold a lone surrogate
or a NUL, which asyncpg and PostgreSQL refuse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Per reply, after escaping: RFC 5321 allows 512 octets per line, and a diagnosis needs
# far less than this; a longer reply is cut and says how much was left out.
MAX_REPLY_TEXT = 4096
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def storable_text(raw: bytes | str, limit: int = MAX_REPLY_TEXT) -> str:
    """A reply's bytes (or text decoded with ``surrogateescape``, as aiosmtplib and the
    pipelined reader decode it) as text PostgreSQL stores and a log line shows as sent.

    Idempotent: text it returned comes back unchanged.
    """
    if isinstance(raw, str):
        if raw.isascii() and len(raw) <= limit and not _UNSAFE.search(raw):
            return raw  # the common case: nothing to do
        try:
            data = raw.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate that no decoder made from a byte
            data = raw.encode("utf-8", "backslashreplace")
    else:
        data = raw
    text = _UNSAFE.sub(_escape, data.decode("utf-8", "backslashreplace"))
    if len(text) <= limit:
        return text
    marker = f" [{len(text)} characters, cut]"
    return text[: max(0, limit - len(marker))] + marker


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str

    def __post_init__(self) -> None:
        clean = storable_text(self.text)
        if clean is not self.text:
            object.__setattr__(self, "text", clean)


@dataclass(slots=True)
class SendReport:
    """What the server answered for one message."""

    accepted: dict[str, Reply] = field(default_factory=dict)
    refused: dict[str, Reply] = field(default_factory=dict)  # 5xx at RCPT
    deferred: dict[str, Reply] = field(default_factory=dict)  # 4xx at RCPT
    data_reply: Reply | None = None  # the reply to the end of DATA, when sent
    data_refused: Reply | None = None  # DATA refused (4xx/5xx): nobody got it
    duration_ms: float = 0.0
