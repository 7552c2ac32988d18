"""A corpus of delivery reports in the formats real MTAs and mailbox providers send,
written from their published formats (RFC 3464 DSNs from Postfix, Gmail and Microsoft
365; an older Exim's and qmail's plain-text bounces; ARF complaints as Yahoo sends them
and as a provider that strips the envelope does; an RFC 3834 auto-reply).

Each file is a ``string.Template``: ``$bounce_address`` (the delivery's envelope
sender), ``$token``, ``$recipient``, ``$message_id`` and ``$ref_header`` (the tracking
header line the daemon adds to every message) are filled in by ``report()``, so a test
can aim a report at a delivery it made. ``EXPECTED`` says what each one is.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent


class Expected(NamedTuple):
    kind: str  # bounce | delay | complaint | auto_reply
    status: str | None  # the RFC 3463 code the report gives for the recipient
    # Whether the report names the original recipient (an ARF report may redact it).
    names_recipient: bool


EXPECTED: dict[str, Expected] = {
    "postfix_dsn_failed": Expected("bounce", "5.1.1", True),
    "postfix_dsn_delayed": Expected("delay", "4.4.1", True),
    "exim_text_failed": Expected("bounce", None, True),
    "exchange_ndr_failed": Expected("bounce", "5.1.10", True),
    "gmail_dsn_failed": Expected("bounce", "5.1.1", True),
    "qmail_text_failed": Expected("bounce", None, True),
    "yahoo_arf_complaint": Expected("complaint", None, True),
    "arf_complaint_stripped_envelope": Expected("complaint", None, False),
    "vacation_auto_reply": Expected("auto_reply", None, True),
}


def report(
    name: str,
    *,
    bounce_address: str,
    token: str,
    recipient: str,
    message_id: str,
    ref_header: str,
) -> bytes:
    """The report ``name`` aimed at one delivery, as the bytes an MTA would send (CRLF)."""
    text = (HERE / f"{name}.eml").read_text(encoding="utf-8")
    filled = string.Template(text).substitute(
        bounce_address=bounce_address,
        token=token,
        recipient=recipient,
        message_id=message_id,
        ref_header=ref_header,
    )
    return filled.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")
