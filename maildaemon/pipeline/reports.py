"""One report's way in, shared by the report listener and ``maildaemon bounces ingest``:
parse (off the loop), match by token, work out the effects, record it all in one
transaction (``store/reports``; effects through the one terminal-outcome writer)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from maildaemon.config import Settings
from maildaemon.delivery import LateOutcome
from maildaemon.logs import event
from maildaemon.reports.effects import late_outcomes
from maildaemon.reports.model import Incoming, Matched, ParsedReport, ReportRecord
from maildaemon.reports.parse import parse
from maildaemon.returnpath import ReturnPath
from maildaemon.returnpath import from_settings as return_path_of
from maildaemon.store.reports.db import ReportStore
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.reports")


def bounded(raw: bytes, limit: int) -> tuple[bytes, bool]:
    """The report as it is kept: its first ``limit`` octets, and whether it was cut."""
    return (raw[:limit], True) if len(raw) > limit else (raw, False)


def read_safely(incoming: Incoming, rp: ReturnPath | None) -> ParsedReport:
    try:
        return parse(incoming.raw, incoming.envelope_to, rp)
    except Exception as exc:  # whatever a report does to the parsers, it is recorded
        return ParsedReport("unknown", unparseable=f"{type(exc).__name__}: {exc}"[:300])


class ReportIntake:
    def __init__(
        self, settings: Settings, store: ReportStore, instruments: Instruments | None = None
    ) -> None:
        self._rp = return_path_of(settings)
        self._store = store
        self._ttl = settings.suppression_ttl
        self._inst = instruments

    async def take(self, incoming: Incoming) -> ReportRecord:
        """Record one report and apply what it says; raises the store's errors (then the
        report is not recorded: the listener answers 451, ``ingest`` exits 75)."""
        parsed = await asyncio.to_thread(read_safely, incoming, self._rp)
        matched = await self.match(parsed)
        late: list[LateOutcome] = []
        lines = [{**dataclasses.asdict(r), "effect": "none"} for r in parsed.recipients]
        if matched.target is not None:
            late, lines = late_outcomes(parsed, matched.target)
        record = await self._store.record(incoming, parsed, matched, late, lines, self._ttl)
        if self._inst is not None and not record.duplicate:
            self._inst.reports.add(1, {"kind": record.kind, "match_status": record.match_status})
        event(
            log,
            "report recorded",
            logging.WARNING if record.match_status == "bad_token" else logging.INFO,
            report_id=record.report_id,
            kind=record.kind,
            match_status=record.match_status,
            delivery_id=record.delivery_id,
            via=incoming.via,
            duplicate=record.duplicate,
            effects=list(record.effects),
            detail=record.detail,
        )
        return record

    async def match(self, parsed: ParsedReport) -> Matched:
        """The delivery the report's first valid token names; or why there is none."""
        if parsed.unparseable is not None:
            return Matched("unparseable", None, parsed.unparseable)
        if self._rp is None:
            return Matched("unmatched", None, "MAIL_BOUNCE_DOMAIN is not set: no token to check")
        checks = [self._rp.check(t) for t in parsed.tokens]
        valid = [c for c in checks if c.status == "valid" and c.ref is not None]
        if not valid:
            if checks:
                return Matched(
                    "bad_token", None, f"token signature does not hold: {checks[0].token}"
                )
            return Matched("unmatched", None, "no token in the report")
        assert valid[0].ref is not None
        target = await self._store.target(valid[0].ref)
        if target is None:
            return Matched("unmatched", None, "valid token, but its delivery is gone (retention)")
        if parsed.loop:
            return Matched("matched", target, "a report about a report: no effect")
        return Matched("matched", target, None)
