"""Typed values that flow between the components (stream → store → scheduler → worker)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from maildaemon.contract.command import DeliveryCommand, Rejection

DeliveryStatus = Literal[
    "queued",
    "rendered",
    "sending",
    "sent",
    "suppressed",
    "failed",
    "dead_letter",
    "expired",
    "cancelled",
    "bounced",  # every recipient bounced after the relay accepted the message (a report)
]
# Why the daemon itself ended or rescheduled a delivery when no SMTP reply says why
# (``failure_code`` on the delivery row and in its outcome event; RUNBOOK lists each).
DAEMON_FAILURE_CODES = {
    "store_unreadable": "the stored row could not be read back into the daemon",
    "unprocessable": "preparing the delivery for sending raised on its data",
    "attempt_fault": "the attempt raised an unexpected error (retried on the ladder)",
    "unrecordable_result": "the attempt's result could not be stored, even without its texts",
    "message_too_large": "the message is larger than the SMTP server's advertised SIZE",
}

AttemptStatus = Literal[
    "sent",
    "transport_failed",
    "timed_out",
    "provider_rejected",
    "unknown",
    "suppressed",
    "failed",
    "expired",
]
TERMINAL_STATUSES: frozenset[str] = frozenset(
    {"sent", "suppressed", "failed", "dead_letter", "expired", "cancelled", "bounced"}
)


@dataclass(frozen=True, slots=True)
class IntakeEntry:
    """One stream entry after validation: a command, or the reason it is not one."""

    stream_entry_id: str
    command: DeliveryCommand | None
    rejection: Rejection | None
    raw: str
    raw_truncated: bool = False


@dataclass(slots=True)
class IntakeResult:
    """What one intake transaction made of a batch of entries."""

    created: list[IntakeEntry] = field(default_factory=list)
    replays: list[tuple[IntakeEntry, str]] = field(default_factory=list)  # (entry, delivery_id)
    rejected: list[tuple[IntakeEntry, Rejection]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """A delivery under a lease: the worker may attempt it until the lease expires."""

    delivery_id: str
    source: str
    claim_token: int
    attempt_no: int
    priority: int
    to_addrs: tuple[str, ...]
    cc_addrs: tuple[str, ...]
    bcc_addrs: tuple[str, ...]
    pending_rcpts: tuple[str, ...] | None
    expires_at: datetime | None
    message_id: str | None
    traceparent: str | None
    possible_duplicate: bool
    rcpts_accepted: int
    ladder_rung: int  # attempts since the retry ladder last started over
    command: dict[str, Any] | None  # present until the message is rendered
    rendered: bytes | None  # the pinned message bytes, once rendered
    stream_entry_id: str | None = None  # "<ms>-<seq>": when the command entered the stream
    unreadable: str | None = None  # why the stored row could not be read back (then ended)

    def envelope_recipients(self) -> tuple[str, ...]:
        # An empty list with nobody served is a record left by an older release (a 4xx to
        # MAIL FROM stored no pending recipients): everyone is still owed the message.
        if self.pending_rcpts is not None and (self.pending_rcpts or self.rcpts_accepted):
            return self.pending_rcpts
        seen: dict[str, None] = {}
        for addr in (*self.to_addrs, *self.cc_addrs, *self.bcc_addrs):
            seen.setdefault(addr, None)
        return tuple(seen)

    def result(
        self,
        started: datetime,
        finished: datetime,
        attempt_status: AttemptStatus,
        delivery_status: DeliveryStatus,
        **fields: Any,
    ) -> AttemptResult:
        """The result of this claim's attempt: its identity (delivery, source, fence token,
        attempt number) and possible-duplicate flag carried over; ``fields`` say the rest."""
        fields.setdefault("possible_duplicate", self.possible_duplicate)
        return AttemptResult(
            delivery_id=self.delivery_id,
            source=self.source,
            claim_token=self.claim_token,
            attempt_no=self.attempt_no,
            started_at=started,
            finished_at=finished,
            attempt_status=attempt_status,
            delivery_status=delivery_status,
            **fields,
        )

    def enqueued_ms(self) -> int | None:
        """When the command was XADDed (the entry id's milliseconds), if known."""
        ms, sep, _ = (self.stream_entry_id or "").partition("-")
        return int(ms) if sep and ms.isdigit() and len(ms) <= 15 else None


@dataclass(frozen=True, slots=True)
class RenderedPin:
    """The rendered message, pinned to a delivery before its first send."""

    delivery_id: str
    claim_token: int
    message_id: str
    content_hash: str
    rendered: bytes
    # The template locale it was rendered in (after fallback); None for a rendered command.
    locale: str | None = None


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    outcome: Literal["accepted", "deferred", "refused", "suppressed"]
    code: int | None
    text: str | None


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """The outcome of one attempt and the delivery's next state, written in one transaction."""

    delivery_id: str
    source: str
    claim_token: int
    attempt_no: int
    attempt_status: AttemptStatus | Literal["cancelled"]
    delivery_status: DeliveryStatus
    started_at: datetime
    finished_at: datetime
    reply_code: int | None = None
    reply_text: str | None = None
    recipients: dict[str, RecipientOutcome] = field(default_factory=dict)
    next_attempt_at: datetime | None = None
    pending_rcpts: tuple[str, ...] | None = None
    status_reason: str | None = None
    suppress: tuple[str, ...] = ()  # addresses to put on the suppression list
    possible_duplicate: bool = False
    record_attempt: bool = True  # False when nothing was tried (e.g. expired before sending)
    claimed: bool = True  # False for an operator's cancel: the delivery was not under a lease
    # Why the daemon ended it when no SMTP reply says why (see FAILURE_CODES); None otherwise.
    failure_code: str | None = None

    @property
    def attempt_count(self) -> int:
        """Attempts on record for the delivery once this result is written: the delivery's
        ``attempt_count``. A result that ends a claimed delivery without an attempt
        (expired, suppressed, stub mode) gives the claim's number back; an operator's cancel
        keeps the count it found. Logs, events and the API all say this number."""
        if self.record_attempt or not self.claimed:
            return self.attempt_no
        return self.attempt_no - 1

    @property
    def dead_letter(self) -> bool:
        return self.delivery_status == "dead_letter"


LateKind = Literal["bounced", "complained", "delayed"]


@dataclass(frozen=True, slots=True)
class LateOutcome:
    """What a report says happened to one recipient after the relay accepted the message:
    written by the one terminal-outcome writer with the report that says it (once per
    delivery, recipient and outcome, whatever number of reports repeat it)."""

    delivery_id: str
    source: str
    address: str  # lower-cased, as mail.delivery_recipients holds it ('' : not known)
    outcome: LateKind
    status_code: str | None = None  # RFC 3463, e.g. "5.1.1"
    diagnostic: str | None = None
    reply_code: int | None = None  # the remote server's reply code, when the report gives it
    suppress: bool = False  # put the address on the suppression list
