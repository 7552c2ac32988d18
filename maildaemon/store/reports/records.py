"""The frozen records the reports store returns."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg


@dataclass(frozen=True, slots=True)
class StoredReport:
    """One recorded report, without its raw bytes (``ReportStore.raw`` reads those)."""

    report_id: int
    received_at: datetime
    via: str
    envelope_from: str | None
    envelope_to: str | None
    raw_size: int
    raw_truncated: bool
    kind: str
    match_status: str
    delivery_id: str | None
    detail: str | None
    subject: str | None
    remote_mta: str | None
    recipients: tuple[dict[str, Any], ...]

    @classmethod
    def of(cls, r: asyncpg.Record) -> StoredReport:
        lines = json.loads(r["recipients"]) if r["recipients"] else []
        return cls(
            report_id=r["report_id"],
            received_at=r["received_at"],
            via=r["via"],
            envelope_from=r["envelope_from"],
            envelope_to=r["envelope_to"],
            raw_size=r["raw_size"],
            raw_truncated=r["raw_truncated"],
            kind=r["kind"],
            match_status=r["match_status"],
            delivery_id=r["delivery_id"],
            detail=r["detail"],
            subject=r["subject"],
            remote_mta=r["remote_mta"],
            recipients=tuple(x for x in lines if isinstance(x, dict)),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "report_id": self.report_id,
            "received_at": self.received_at.isoformat(),
            "via": self.via,
            "envelope_from": self.envelope_from,
            "envelope_to": self.envelope_to,
            "raw_size": self.raw_size,
            "raw_truncated": self.raw_truncated,
            "kind": self.kind,
            "match_status": self.match_status,
            "delivery_id": self.delivery_id,
            "detail": self.detail,
            "subject": self.subject,
            "remote_mta": self.remote_mta,
            "recipients": list(self.recipients),
        }


@dataclass(frozen=True, slots=True)
class StoredLateOutcome:
    address: str
    outcome: str
    status_code: str | None
    diagnostic: str | None
    report_id: int
    at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "outcome": self.outcome,
            "status_code": self.status_code,
            "diagnostic": self.diagnostic,
            "report_id": self.report_id,
            "at": self.at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class ReportPage:
    """Recent reports, newest first; ``next_before``: the ``before`` of the next page."""

    items: list[StoredReport]
    next_before: int | None


@dataclass(frozen=True, slots=True)
class Rate:
    """Sent deliveries (per domain: recipients) and the bounces and complaints among them."""

    key: str
    sent: int
    bounced: int
    complained: int
    bounce_rate: float | None  # bounced / sent; None when nothing was sent
    complaint_rate: float | None


@dataclass(frozen=True, slots=True)
class Rates:
    hours: int
    by_source: list[Rate]
    by_recipient_domain: list[Rate]
