"""The typed values a report becomes: its kind, its recipients' fates, the tokens it holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["bounce", "delay", "complaint", "auto_reply", "unknown"]
MatchStatus = Literal["matched", "unmatched", "bad_token", "unparseable"]
KINDS: tuple[Kind, ...] = ("bounce", "delay", "complaint", "auto_reply", "unknown")
MATCH_STATUSES: tuple[MatchStatus, ...] = ("matched", "unmatched", "bad_token", "unparseable")


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """What a report says about one recipient (RFC 3464 per-recipient fields, or the like)."""

    address: str
    action: Literal["failed", "delayed", "delivered", "complained"]
    status: str | None = None  # RFC 3463 enhanced status code, e.g. "5.1.1"
    diagnostic: str | None = None  # "smtp; 550 5.1.1 <bob@example.com>: user unknown"
    remote_mta: str | None = None


@dataclass(frozen=True, slots=True)
class ParsedReport:
    """One report as read: its kind, recipients, the tokens it holds (most trusted first)."""

    kind: Kind
    recipients: tuple[RecipientReport, ...] = ()
    tokens: tuple[str, ...] = ()
    subject: str | None = None
    unparseable: str | None = None  # why it could not be read; None when it could
    loop: bool = False  # a report about a report: recorded, never acted on
    format: str = "none"  # rfc3464, rfc5965, rfc3834, flufl.bounce:<detector>, none


@dataclass(frozen=True, slots=True)
class Incoming:
    """A report as it arrived: the raw bytes (bounded) and its envelope, when known."""

    raw: bytes
    via: Literal["listener", "ingest"]
    envelope_from: str | None = None
    envelope_to: tuple[str, ...] = ()
    size: int = 0  # octets received (raw holds at most the bound)
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class Target:
    """The delivery a valid token names, as the store found it."""

    delivery_id: str
    source: str
    status: str
    recipients: tuple[str, ...]  # lower-cased, as mail.delivery_recipients holds them


@dataclass(frozen=True, slots=True)
class Matched:
    """Which delivery a report belongs to, or why none."""

    status: MatchStatus
    target: Target | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class ReportRecord:
    """A stored report: its id, and what it was matched to and did."""

    report_id: int
    kind: Kind
    match_status: MatchStatus
    delivery_id: str | None
    detail: str | None
    duplicate: bool = False  # the same bytes were recorded before: nothing done again
    effects: tuple[str, ...] = field(default_factory=tuple)  # "bounced <addr>", ...
