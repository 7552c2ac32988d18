"""What a well-formed message on the wire is: the check the fuzzing suites apply to every
message the daemon builds or the STARTTLS sink receives."""

from __future__ import annotations

import email.policy
import re
from email.message import EmailMessage
from email.parser import BytesParser

from maildaemon.contract.limits import RESERVED_HEADERS

OURS = frozenset(
    {"date", "from", "to", "cc", "reply-to", "subject", "message-id", "mime-version"}
    | {"content-type", "content-transfer-encoding", "dkim-signature"}
)
ONCE = ("date", "from", "subject", "message-id", "mime-version", "content-type")
_NAME = re.compile(rb"[!-9;-~]+")


def assert_well_formed(raw: bytes, custom: frozenset[str]) -> EmailMessage:
    """ASCII, CRLF only, lines within 998, only our headers and the allowed custom ones
    (each once), no Bcc, and the stdlib parser in strict mode finds no defect."""
    assert raw.isascii(), "8-bit data on the wire"
    assert raw.endswith(b"\r\n")
    for line in raw.split(b"\r\n")[:-1]:
        assert b"\r" not in line and b"\n" not in line, f"bare CR or LF in {line[:80]!r}"
        assert len(line) <= 998, "line longer than 998"
    head = raw.split(b"\r\n\r\n", 1)[0]
    names: list[str] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            continue
        name, colon, _ = line.partition(b":")
        assert colon and _NAME.fullmatch(name), f"not a header line: {line[:80]!r}"
        names.append(name.decode().lower())
    unexpected = set(names) - OURS - custom
    assert not unexpected, f"injected header lines: {unexpected}"
    assert "bcc" not in names
    for name in ONCE:
        assert names.count(name) == 1, f"{name} appears {names.count(name)} times"
    for name in custom:
        assert names.count(name) <= 1 and name not in RESERVED_HEADERS
    parsed = BytesParser(policy=email.policy.strict).parsebytes(raw)
    assert isinstance(parsed, EmailMessage)
    for part in parsed.walk():
        assert not part.defects, part.defects
        if not part.is_multipart():
            part.get_content()
    return parsed
